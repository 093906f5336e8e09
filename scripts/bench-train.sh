#!/usr/bin/env bash
# bench-train.sh: fleet-train's training step against a PyTorch eager step of the same model in
# the same run (scripts/bench.sh calls it; it also runs alone). One process, fp32, on the CPU
# unless DEVICE=cuda. Prints the median step time of each and the ratio; asserts nothing.
#
#   PRESET=base BATCH=32 SEQ=128 STEPS=4 DEVICE=cpu PRECISION=fp32 scripts/bench-train.sh
#
# The data are 600 rows of 200 random words drawn from 40,000, so every text fills SEQ tokens and
# the vocabulary built from it has BERT's 30,522 entries.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-base} BATCH=${BATCH:-32} SEQ=${SEQ:-128} STEPS=${STEPS:-4}
DEVICE=${DEVICE:-cpu} PRECISION=${PRECISION:-fp32}
TRAINER=${TRAINER:-}

if [[ -z $TRAINER ]]; then
  scripts/setup.sh
  source scripts/env.sh
  cargo build --release --locked --quiet --features train --bin fleet-train
  TRAINER=$PWD/target/release/fleet-train
fi
python=${FLEET_TORCH_VENV:-/opt/fleet/torch-venv}/bin/python

work=$(mktemp -d /tmp/fleet-bench-train.XXXXXX)
trap 'rm -rf "$work"' EXIT
"$python" scripts/random_words_csv.py "$work/data.csv" 600 200 3

cd "$work"
"$TRAINER" --data data.csv --preset "$PRESET" --vocab-size 30522 --max-len "$SEQ" \
  --batch-size "$BATCH" --epochs 1 --max-steps "$STEPS" --log-every 1 --val-fraction 0 \
  --device "$DEVICE" --precision "$PRECISION" --output model --checkpoint-dir checkpoints >progress.jsonl
ours=$("$python" -c '
import json, statistics, sys
steps = [json.loads(l)["step_ms"] for l in open(sys.argv[1]) if "\"progress\"" in l]
print(statistics.median(steps[1:] or steps))' progress.jsonl)
theirs=$("$python" "$OLDPWD/scripts/bench_train.py" model "$BATCH" "$SEQ" "$STEPS" "$DEVICE" "$PRECISION" \
  | "$python" -c 'import json, sys; print(json.load(sys.stdin)["step_ms"])')
printf 'train %-10s %s batch %d seq %d %s: fleet-train %.1f ms/step, PyTorch eager %.1f ms/step, fleet-train/PyTorch %.2fx\n' \
  "$PRESET" "$DEVICE" "$BATCH" "$SEQ" "$PRECISION" "$ours" "$theirs" "$(awk -v a="$ours" -v b="$theirs" 'BEGIN { print a / b }')"
