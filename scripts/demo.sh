#!/usr/bin/env bash
# demo.sh: the quick start. On a fresh machine (Debian, root) it installs what is missing
# (scripts/setup.sh), builds fleet and fleet-train, starts three OpenSSH hosts in network
# namespaces (scripts/testbed.sh), writes the seed guide's training_data_10000.csv, then runs what
# a user runs on three real PCs: fleet sync, fleet check, fleet run of three fleet-train ranks
# (the tiny BERT preset from scratch, on the CPU) with their merged log and a live status line.
# It ends with the final validation accuracy and the loss curve in
# $DEMO_DIR/runs/<job>/training.svg (DEMO_DIR defaults to /tmp/fleet-demo and is kept).
# The hosts are taken down again at the end, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
source scripts/env.sh
echo "demo: building fleet and fleet-train (release; about 5 minutes the first time)" >&2
cargo build --release --locked --quiet --workspace
fleet=$PWD/target/release/fleet
trainer=$PWD/target/release/fleet-train

export TB_DIR=${TB_DIR:-/tmp/fleet-testbed}
project=${DEMO_DIR:-/tmp/fleet-demo}
scripts/testbed.sh down 2>/dev/null || true
trap 'scripts/testbed.sh down' EXIT
scripts/testbed.sh up netns

# The project every host gets: the trainer and the data.
rm -rf "$project"
mkdir -p "$project/data"
cp "$trainer" "$project/fleet-train"
"$trainer" gen-data --rows 10000 --out "$project/data/training_data_10000.csv"
sed "s|^master_port = 29500|master_port = 29500\n\n[sync]\nsource = \"$project\"|" "$TB_DIR/fleet.toml" >"$project/fleet.toml"
export FLEET_INVENTORY=$project/fleet.toml

step() { printf '\n+ %s\n' "$*" >&2; "$@"; }
step "$fleet" inventory
step "$fleet" sync
step "$fleet" check
step "$fleet" run -- ./fleet-train --data data/training_data_10000.csv --preset tiny --epochs 3 --log-every 10
