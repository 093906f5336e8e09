#!/usr/bin/env bash
# demo.sh: fleet on a local three-host fleet. Installs what is missing, builds fleet, starts three
# OpenSSH hosts in network namespaces (scripts/testbed.sh), then shows the inventory, syncs a small
# project to every host, verifies it there, checks the hosts, and runs a three-rank job whose merged
# log streams back.
# The hosts are taken down again at the end, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --locked --quiet
fleet=$PWD/target/release/fleet

export TB_DIR=${TB_DIR:-/tmp/fleet-testbed}
project=$(mktemp -d /tmp/fleet-demo.XXXXXX)
scripts/testbed.sh down 2>/dev/null || true
trap 'scripts/testbed.sh down; rm -rf "$project"' EXIT
scripts/testbed.sh up netns

# A small project: data and a script that every rank runs.
mkdir -p "$project/data"
seq 1 10000 | awk '{print "example " $1 "," $1 % 2}' >"$project/data/training_data_10000.csv"
cat >"$project/train.sh" <<'SCRIPT'
#!/bin/sh
# Each rank counts its shard of the data: rows where row number % WORLD_SIZE == RANK.
rows=$(awk -F, -v r="$RANK" -v w="$WORLD_SIZE" 'NR % w == r' data/training_data_10000.csv | wc -l)
echo "rank $RANK of $WORLD_SIZE on $(hostname): $rows rows, master $MASTER_ADDR:$MASTER_PORT via $GLOO_SOCKET_IFNAME"
SCRIPT
chmod +x "$project/train.sh"
sed "s|^master_port = 29500|master_port = 29500\n\n[sync]\nsource = \"$project\"|" "$TB_DIR/fleet.toml" >"$project/fleet.toml"
export FLEET_INVENTORY=$project/fleet.toml

step() { printf '\n+ %s\n' "$*" >&2; "$@"; }
step "$fleet" inventory
step "$fleet" sync
step "$fleet" sync --verify
step "$fleet" check
step "$fleet" run -- ./train.sh
