#!/usr/bin/env bash
# bench.sh: fleet against the tools a user would use instead, side by side in the same run, on a
# test bed of three OpenSSH hosts of its own. Prints medians and ratios; asserts nothing.
#
#   exec: `fleet exec -- true` on 3 hosts vs 3 parallel OpenSSH `ssh HOST true` (connect, auth, run)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-20}

scripts/setup.sh
cargo build --release --locked --quiet
fleet=$PWD/target/release/fleet

export TB_DIR=/tmp/fleet-testbed-bench TB_NS_PREFIX=fb- TB_BRIDGE=fbbr0 TB_SUBNET=10.213.2
scripts/testbed.sh down 2>/dev/null || true
trap 'scripts/testbed.sh down' EXIT
scripts/testbed.sh up netns 2>/dev/null
mapfile -t hosts < <(cut -f1 "$TB_DIR/hosts.tsv")

# Median wall time in milliseconds of ROUNDS runs of "$@".
median_ms() {
  local i start end times=()
  for ((i = 0; i < ROUNDS; i++)); do
    start=$(date +%s%N)
    "$@" >/dev/null 2>&1 || { echo "bench: '$*' failed" >&2; exit 1; }
    end=$(date +%s%N)
    times+=($(((end - start) / 1000)))
  done
  printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "%.1f\n", m / 1000}'
}

fleet_exec() { "$fleet" -i "$TB_DIR/fleet.toml" exec -- true; }
openssh_exec() {
  local h pids=()
  for h in "${hosts[@]}"; do ssh -F "$TB_DIR/ssh_config" "$h" true & pids+=($!); done
  for h in "${pids[@]}"; do wait "$h"; done
}

fleet_ms=$(median_ms fleet_exec)
ssh_ms=$(median_ms openssh_exec)
printf 'exec on %d hosts (median of %d): fleet %s ms, OpenSSH ssh in parallel %s ms, ratio ssh/fleet %.1fx\n' \
  "${#hosts[@]}" "$ROUNDS" "$fleet_ms" "$ssh_ms" "$(awk -v a="$ssh_ms" -v b="$fleet_ms" 'BEGIN { print a / b }')"
