# shellcheck shell=sh
# probe.sh WORKDIR ACTIVATE PROBE_PY [KEY COMMAND]...: what fleet check compares, one key=value
# per line, inside the environment the ACTIVATE line makes (the jobs' own): a failing line is
# reported as activate_error= with what it printed, and the rest is probed without it.
# PROBE_PY is probe.py's text; each KEY COMMAND pair is a [[check]], reported as check.KEY with
# the first line COMMAND prints, run by sh in the workdir.
# shellcheck disable=SC2154 # $workdir is set by workdir_of (prelude.sh)
workdir_of "$1"
errors=$(mktemp 2>/dev/null || echo "/tmp/fleet-probe.$$")
if ! activate "$2" 2>"$errors"; then
  # What the line printed, without activate's own "failed (exit N)" unless that is all there is.
  said=$(grep -v '^fleet: activate = ' "$errors" | tr '\n' ' ')
  printf 'activate_error=%s\n' "${said:-$(tr '\n' ' ' <"$errors")}"
fi
rm -f -- "$errors"
probe_py=$3
shift 3
echo "os=$(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-$(uname -s)}")"
echo "arch=$(uname -m)"
echo "kernel=$(uname -r)"
# WSL 2 (a kernel named "...microsoft-standard-WSL2"): its networking mode decides whether the
# other PCs reach it at all. wslinfo (WSL 2.0 and later) names it; the kernel config tells older ones.
case $(uname -r) in
  *[Mm]icrosoft*)
    mode=$(wslinfo --networking-mode 2>/dev/null | tr -d '\r')
    echo "wsl_networking=${mode:-unknown}"
    ;;
esac
echo "hostname=$(hostname)"
echo "hostname_address=$(getent hosts "$(hostname)" | awk '{print $1; exit}')"
d=$workdir
while [ ! -d "$d" ] && [ "$d" != / ] && [ "$d" != . ]; do d=$(dirname -- "$d"); done
echo "disk_free_mb=$(df -Pk -- "$d" | awk 'NR==2 {print int($4 / 1024)}')"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv,noheader,nounits 2>/dev/null | sed 's/^/gpu=/'
  echo "gpu_processes=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | wc -l)"
  echo "cuda_driver=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -n 1)"
else
  echo "gpu_tool=not installed"
fi
if command -v python3 >/dev/null 2>&1; then
  python3 -c "$probe_py"
else
  echo "python=not installed"
fi
for tool in torchrun accelerate; do
  path=$(command -v "$tool" 2>/dev/null)
  echo "tool.$tool=${path:-not installed}"
done
# fleet-train in the workdir (./fleet-train) and on PATH (fleet-train): its --version line, or
# "fails: " and what it printed (its libtorch not found, say).
fleet_train() { # KEY PROGRAM
  if [ -z "$2" ] || [ ! -x "$2" ]; then
    echo "$1=not installed"
  elif out=$("$2" --version 2>&1); then
    echo "$1=$(printf '%s\n' "$out" | head -n 1)"
  else
    echo "$1=fails: $(printf '%s\n' "$out" | tr '\n' ' ')"
  fi
}
fleet_train fleet_train "$workdir/fleet-train"
fleet_train fleet_train_on_path "$(command -v fleet-train 2>/dev/null)"
while [ $# -ge 2 ]; do
  printf 'check.%s=%s\n' "$1" "$(cd -- "$workdir" 2>/dev/null || :; sh -c "$2" 2>&1 | head -n 1)"
  shift 2
done
# The host's clock, read last: the laptop compares it with when the answer arrives, which the
# probe's own run time (importing torch takes seconds) cannot skew.
echo "time_ms=$(($(date +%s%N) / 1000000))"
# The last line: without it the probe did not run to its end.
echo probe_complete=yes
