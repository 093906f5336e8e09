#!/usr/bin/env bash
# bench-net.sh: fleet-train's measured gradient all-reduce against `fleet net`'s estimate, in the
# same run, with host2's link shaped (tbf, both ways) to each rate in turn. BERT-base gradients
# (109.5 M parameters) on RANKS ranks (3), one per test-bed host, fp32 and bf16 on the wire, without
# overlap (so the time measured is the all-reduce's alone, after the ranks have met), then with
# overlap, and PyTorch's own Gloo all-reduce of as many values in the same buckets beside it
# (scripts/bench_allreduce.py). Batches are tiny (1 row of 16 tokens) so the CPU's compute stays short. The first
# rate, "none", leaves the link as it is: its all-reduce time is what the CPU work costs here
# (copies, reductions, the kernel's TCP over veth for three ranks on this machine's cores), and
# each shaped rate also prints its time beyond that floor against the estimate. RANKS=2 gives
# each rank one of two cores, where the floor is lower. scripts/bench.sh calls it; it also runs
# alone. Prints the times and ratios; asserts nothing.
#
# The powersgd part: fleet-train's step with --powersgd-rank 4 (from the first step) against the
# same step with plain fp32 averaging, small preset with the same vocabulary, PSGD_STEPS steps
# (6), and the bytes each rank put into the all-reduces per step. Beside them, in the same run,
# PyTorch DDP with its own powerSGD_hook at rank 4 on the same model (scripts/bench_powersgd.py,
# started by `fleet run`): the mean step once both compress (steps 4 on; PyTorch compresses from
# its third step), and fleet-train's PowerSGD all-reduce time against `fleet net`'s estimate.
#
#   RATES="none 1gbit 100mbit" STEPS=3 RANKS=3 PARTS="allreduce powersgd" scripts/bench-net.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RATES=${RATES:-none 1gbit 100mbit}
STEPS=${STEPS:-3}
RANKS=${RANKS:-3}
PSGD_STEPS=${PSGD_STEPS:-6}
PARTS=" ${PARTS:-allreduce powersgd} "
part() { [[ $PARTS == *" $1 "* ]]; }

scripts/setup.sh
source scripts/env.sh
cargo build --release --locked --quiet --workspace
fleet=$PWD/target/release/fleet
trainer=$PWD/target/release/fleet-train
python=$FLEET_TORCH_VENV/bin/python

export TB_DIR=/tmp/fleet-testbed-bench-net TB_NS_PREFIX=fn- TB_BRIDGE=fnbr0 TB_SUBNET=10.213.3 TB_N=$RANKS
scripts/testbed.sh down 2>/dev/null || true
work=$(mktemp -d /tmp/fleet-bench-net.XXXXXX)
trap 'scripts/testbed.sh down; rm -rf "$work"' EXIT
scripts/testbed.sh up netns 2>/dev/null

# 200 rows of random words drawn from 40,000: the vocabulary built from them has BERT's 30,522
# entries, so the base preset has BERT-base's size.
"$python" scripts/random_words_csv.py "$work/data.csv" 200 600 2
cp "$trainer" "$work/fleet-train"
cp scripts/bench_allreduce.py "$work/"
sed "s|^master_port = 29500|master_port = 29500\n\n[sync]\nsource = \"$work\"|" "$TB_DIR/fleet.toml" >"$work/fleet.toml"
export FLEET_INVENTORY=$work/fleet.toml
# The small preset's config.json, for PyTorch's side and fleet net's --model (one local step).
(cd "$work" && "$trainer" --data data.csv --preset small --vocab-size 30522 --max-len 16 \
  --batch-size 1 --epochs 1 --max-steps 1 --val-fraction 0 --output small-model \
  --checkpoint-dir "$work/local-checkpoints" >/dev/null)
cp scripts/bench_powersgd.py "$work/"
"$fleet" sync >/dev/null 2>&1

# rank_means MARKER FIELD...: from `fleet --json run`'s records, the ranks' JSON lines holding
# MARKER (one per rank, RANKS of them), and the ranks' mean of each FIELD.
rank_means() {
  "$python" -c '
import json, sys
marker, fields, ranks = sys.argv[1], sys.argv[2:-1], int(sys.argv[-1])
lines = [r["line"] for r in map(json.loads, sys.stdin) if r.get("type") == "line"]
s = [json.loads(l) for l in lines if marker in l]
if len(s) != ranks:
    sys.exit("bench-net: expected %d lines with %s, got %d" % (ranks, marker, len(s)))
means = [sum(x[f] for x in s) / len(s) for f in fields]
print(*(int(m) if m == int(m) else m for m in means))' "$@" "$RANKS"
}

# train WIRE [OVERLAP-FLAG]: prints the ranks' mean comm_ms, wait_ms and step_ms, and params.
train() {
  "$fleet" --json run -- ./fleet-train --data data.csv --preset base --vocab-size 30522 --max-len 16 \
    --batch-size 1 --epochs 1 --max-steps "$STEPS" --val-fraction 0 --dropout 0 \
    --allreduce-dtype "$1" ${2:-} --output model --checkpoint-dir checkpoints 2>/dev/null |
    rank_means '"event":"summary"' comm_ms wait_ms step_ms params
}

# pytorch WIRE PARAMS: PyTorch's own Gloo all-reduce of as many values, in the same buckets
# (scripts/bench_allreduce.py): the ranks' mean milliseconds per step.
pytorch() {
  "$fleet" --json run -- "$python" bench_allreduce.py --params "$2" --dtype "$1" --steps "$STEPS" 2>/dev/null |
    rank_means allreduce_ms allreduce_ms
}

# small EXTRA...: `fleet --json run`'s records of fleet-train, small preset, PSGD_STEPS steps, a
# progress event after every step.
small() {
  "$fleet" --json run -- ./fleet-train --data data.csv --preset small --vocab-size 30522 --max-len 16 \
    --batch-size 1 --epochs 1 --max-steps "$PSGD_STEPS" --val-fraction 0 --dropout 0 \
    --output model --checkpoint-dir checkpoints --log-every 1 "$@" 2>/dev/null
}

# steady: from small's records, the ranks' mean step_ms (every step), the mean step_ms of rank
# 0's progress events after step 3, and the ranks' mean comm_ms and comm_bytes_per_step.
steady() {
  "$python" -c '
import json, sys
lines = [r["line"] for r in map(json.loads, sys.stdin) if r.get("type") == "line"]
events = [json.loads(l) for l in lines if l.startswith("{")]
steps = [e["step_ms"] for e in events if e.get("event") == "progress" and e["step"] > 3]
summaries = [e for e in events if e.get("event") == "summary"]
if not steps or len(summaries) != int(sys.argv[1]):
    sys.exit("bench-net: no steps after the third, or not one summary per rank")
mean = lambda xs: sum(xs) / len(xs)
print(*(mean([s[f] for s in summaries]) for f in ["step_ms"]), mean(steps),
      *(mean([s[f] for s in summaries]) for f in ["comm_ms", "comm_bytes_per_step"]))' "$RANKS"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
floor32=0 floor16=0
for rate in $RATES; do
  if [[ $rate != none ]]; then scripts/testbed.sh shape host2 "$rate"; fi
  if part powersgd; then
    read -r plain_ms _ _ plain_bytes < <(small | steady)
    read -r psgd_ms ours_ms ours_comm psgd_bytes < <(small --powersgd-rank 4 --powersgd-warmup-steps 0 | steady)
    printf 'net %-7s small preset, %d ranks, %d steps: fp32 step %.0f ms (%.0f bytes per rank and step), PowerSGD rank 4 %.0f ms (%.0f bytes, %sx fewer), PowerSGD/fp32 step %sx\n' \
      "$rate" "$RANKS" "$PSGD_STEPS" "$plain_ms" "$plain_bytes" "$psgd_ms" "$psgd_bytes" \
      "$(ratio "$plain_bytes" "$psgd_bytes")" "$(ratio "$psgd_ms" "$plain_ms")"
    read -r theirs_ms theirs_bytes < <("$fleet" --json run -- "$python" bench_powersgd.py --model small-model \
      --rank 4 --seq 16 --steps "$PSGD_STEPS" 2>/dev/null |
      rank_means powersgd_step_ms powersgd_step_ms powersgd_bytes_per_step)
    estimate=$("$fleet" --json net --seconds 2 --model "$work/small-model" | "$python" -c '
import json, sys
e = next(r for r in map(json.loads, sys.stdin) if r["type"] == "estimate")
print(next(p["allreduce_ms"] for p in e["powersgd"] if p["rank"] == 4))')
    printf 'net %-7s PowerSGD rank 4, steps 4-%d: fleet-train %.0f ms/step (%.0f bytes), PyTorch powerSGD_hook %.0f ms/step (%.0f bytes), fleet-train/PyTorch %sx; fleet-train all-reduce %.0f ms/step, estimate %.0f ms (%sx)\n' \
      "$rate" "$PSGD_STEPS" "$ours_ms" "$psgd_bytes" "$theirs_ms" "$theirs_bytes" "$(ratio "$ours_ms" "$theirs_ms")" \
      "$ours_comm" "$estimate" "$(ratio "$ours_comm" "$estimate")"
  fi
  if ! part allreduce; then
    if [[ $rate != none ]]; then scripts/testbed.sh unshape host2; fi
    continue
  fi
  read -r fp32 wait32 step32 params < <(train fp32 --no-overlap)
  read -r bf16 _ _ _ < <(train bf16 --no-overlap)
  read -r estimate_fp32 estimate_bf16 bottleneck < <("$fleet" --json net --seconds 2 --params "$params" |
    "$python" -c '
import json, sys
e = next(r for r in map(json.loads, sys.stdin) if r["type"] == "estimate")
print(e["allreduce_fp32_ms"], e["allreduce_bf16_ms"], e["bottleneck_mbit"])')
  read -r overlapped _ step_overlapped _ < <(train fp32)
  torch32=$(pytorch fp32 "$params")
  torch16=$(pytorch bf16 "$params")
  if [[ $rate != none ]]; then scripts/testbed.sh unshape host2; fi
  printf 'net %-7s %d ranks, measured %.0f Mbit/s, %d parameters: all-reduce fp32 %.0f ms/step (estimate %.0f ms, %sx), bf16 %.0f ms (estimate %.0f ms, %sx), bf16/fp32 %sx\n' \
    "$rate" "$RANKS" "$bottleneck" "$params" "$fp32" "$estimate_fp32" "$(ratio "$fp32" "$estimate_fp32")" \
    "$bf16" "$estimate_bf16" "$(ratio "$bf16" "$estimate_bf16")" "$(ratio "$bf16" "$fp32")"
  printf 'net %-7s PyTorch (Gloo, the same buckets): fp32 %.0f ms (estimate %sx; fleet-train/PyTorch %sx), bf16 %.0f ms (%sx; %sx)\n' \
    "$rate" "$torch32" "$(ratio "$torch32" "$estimate_fp32")" "$(ratio "$fp32" "$torch32")" \
    "$torch16" "$(ratio "$torch16" "$estimate_bf16")" "$(ratio "$bf16" "$torch16")"
  if [[ $rate == none ]]; then
    floor32=$fp32 floor16=$bf16
  else
    x32=$(awk -v a="$fp32" -v f="$floor32" 'BEGIN { print a - f }')
    x16=$(awk -v a="$bf16" -v f="$floor16" 'BEGIN { print a - f }')
    printf 'net %-7s beyond the unshaped floor: fp32 %.0f ms (%sx of the estimate), bf16 %.0f ms (%sx), bf16/fp32 %sx\n' \
      "$rate" "$x32" "$(ratio "$x32" "$estimate_fp32")" "$x16" "$(ratio "$x16" "$estimate_bf16")" "$(ratio "$x16" "$x32")"
  fi
  printf 'net %-7s fp32 step %.0f ms without overlap (%.0f ms of it waiting for the slowest rank), %.0f ms with overlap (%.0f ms waiting on the all-reduce)\n' \
    "$rate" "$step32" "$wait32" "$step_overlapped" "$overlapped"
done
