# shellcheck shell=sh
# gpu_count.sh: how many NVIDIA GPUs the host has (0 without nvidia-smi or a driver).
n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
echo "${n:-0}"
