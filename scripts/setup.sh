#!/usr/bin/env bash
# setup.sh: installs what building and testing fleet need on a fresh Debian machine. Idempotent:
# what is present already is left alone, so a second run takes a second.
#
#   Debian packages: openssh-server and openssh-client (the test bed's hosts), iproute2 (network
#   namespaces), iptables (firewall faults in tests), rsync (the benchmark's baseline), procps
#   (pgrep), python3 (what training hosts have: fleet check listens on the master port with it).
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

packages=(openssh-server openssh-client iproute2 iptables rsync procps python3)
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

command -v cargo >/dev/null || { log "cargo is missing: install Rust from https://rustup.rs"; exit 1; }
log "ready"
