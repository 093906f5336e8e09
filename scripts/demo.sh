#!/usr/bin/env bash
# demo.sh: fleet on a local three-host fleet. Installs what is missing, builds fleet, starts three
# OpenSSH hosts in network namespaces (scripts/testbed.sh), shows the inventory fleet reads, runs
# a command on all three at once, and takes the hosts down again, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --locked --quiet
fleet=target/release/fleet

export TB_DIR=${TB_DIR:-/tmp/fleet-testbed}
scripts/testbed.sh down 2>/dev/null || true
trap 'scripts/testbed.sh down' EXIT
scripts/testbed.sh up netns
export FLEET_INVENTORY=$TB_DIR/fleet.toml

echo "+ fleet inventory" >&2
$fleet inventory
echo "+ fleet exec -- sh -c 'echo \$(hostname): \$(nproc) cores, \$(uname -sr)'" >&2
$fleet exec -- sh -c 'echo $(hostname): $(nproc) cores, $(uname -sr)'
