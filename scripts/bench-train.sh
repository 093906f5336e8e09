#!/usr/bin/env bash
# bench-train.sh: fleet-train's training step against a PyTorch eager step of the same model
# (transformers' BertForSequenceClassification, scripts/bench_train.py), interleaved so that both
# sides see the same machine: ROUNDS rounds, each running fleet-train for STEPS steps and then
# PyTorch for STEPS steps, both with THREADS intra-op threads. Each round's figure is the median
# of its steps after the first (warm-up); it prints every round's ratio, then the median of the
# rounds' ratios with their spread. One process, fp32, on the CPU unless DEVICE=cuda.
# scripts/bench.sh calls it; it also runs alone. Asserts nothing.
#
#   PRESET=base BATCH=32 SEQ=128 STEPS=4 ROUNDS=5 THREADS=$(nproc) DEVICE=cpu PRECISION=fp32 scripts/bench-train.sh
#
# The data are 600 rows of 200 random words drawn from 40,000, so every text fills SEQ tokens and
# the vocabulary built from it has BERT's 30,522 entries.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-base} BATCH=${BATCH:-32} SEQ=${SEQ:-128} STEPS=${STEPS:-4} ROUNDS=${ROUNDS:-5}
THREADS=${THREADS:-$(nproc)} DEVICE=${DEVICE:-cpu} PRECISION=${PRECISION:-fp32}
TRAINER=${TRAINER:-}

if [[ -z $TRAINER ]]; then
  scripts/setup.sh
  source scripts/env.sh
  cargo build --release --locked --quiet -p fleet-train
  TRAINER=$PWD/target/release/fleet-train
fi
python=${FLEET_TORCH_VENV:-/opt/fleet/torch-venv}/bin/python
bench=$PWD/scripts/bench_train.py
# Both sides size their thread pools from this (libtorch's OpenMP for fleet-train, torch's for
# PyTorch).
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

work=$(mktemp -d /tmp/fleet-bench-train.XXXXXX)
trap 'rm -rf "$work"' EXIT
"$python" scripts/random_words_csv.py "$work/data.csv" 600 200 3
cd "$work"

# fleet_train: the median step of one fleet-train run, after its first step.
fleet_train() {
  "$TRAINER" --data data.csv --preset "$PRESET" --vocab-size 30522 --max-len "$SEQ" \
    --batch-size "$BATCH" --epochs 1 --max-steps "$STEPS" --log-every 1 --val-fraction 0 \
    --device "$DEVICE" --precision "$PRECISION" --output model --checkpoint-dir checkpoints >progress.jsonl
  "$python" -c '
import json, statistics, sys
steps = [json.loads(l)["step_ms"] for l in open(sys.argv[1]) if "\"progress\"" in l]
print(statistics.median(steps[1:] or steps))' progress.jsonl
}

# pytorch: the median step of one PyTorch run of the model fleet-train exported, after its first.
pytorch() {
  "$python" "$bench" model "$BATCH" "$SEQ" "$STEPS" "$DEVICE" "$PRECISION" |
    "$python" -c 'import json, sys; print(json.load(sys.stdin)["step_ms"])'
}

ratios=()
for round in $(seq "$ROUNDS"); do
  ours=$(fleet_train)
  theirs=$(pytorch)
  ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.3f", a / b }')
  ratios+=("$ratio")
  printf 'train %-5s round %d of %d: fleet-train %.1f ms/step, PyTorch eager %.1f ms/step, %sx\n' \
    "$PRESET" "$round" "$ROUNDS" "$ours" "$theirs" "$ratio"
done
"$python" - "$PRESET" "$DEVICE" "$BATCH" "$SEQ" "$PRECISION" "$THREADS" "${ratios[@]}" <<'EOF'
import statistics, sys
preset, device, batch, seq, precision, threads, *ratios = sys.argv[1:]
ratios = sorted(map(float, ratios))
print(f"train {preset:<5} {device} batch {batch} seq {seq} {precision}, {threads} threads, "
      f"{len(ratios)} interleaved rounds: fleet-train/PyTorch median {statistics.median(ratios):.2f}x "
      f"(spread {ratios[0]:.2f}x-{ratios[-1]:.2f}x)")
EOF
