#!/usr/bin/env bash
# bench.sh: fleet against the tools a user would use instead, side by side in the same run, on a
# test bed of three OpenSSH hosts of its own. Prints medians and ratios, then compares each
# exec, sync and run ratio with the one docs/benchmarks.md last recorded: a ratio more than
# NOISE (default 1.25, as this shared machine moves 10-20% between runs) times the recorded one
# is called a regression, and the script then exits 1.
#
#   exec: `fleet exec -- true` on 3 hosts vs 3 parallel OpenSSH `ssh HOST true` (connect, auth, run)
#   sync: `fleet sync` vs `rsync -a` over OpenSSH to the same 3 hosts in parallel, same tree:
#         (a) cold: 2,000 small files (~40 MB) plus one 200 MB CSV, nothing on the hosts yet
#         (b) warm: the same, nothing changed
#         (c) one file changed among 10,000
#   run:  time from `fleet run` until every rank has started, vs a parallel OpenSSH loop starting
#         the same command; merged-log throughput of 3 ranks x 200,000 lines vs `ssh host seq N`
#   train: fleet-train's step vs a PyTorch eager step of the same BERT (scripts/bench-train.sh;
#         BERT-base, batch 32, sequence 128, on the CPU here; DEVICE=cuda on a GPU)
#   check: fleet check's check between hosts (every host listens on a port its kernel picks, every
#         other host connects) vs the same 6 connections made by hand over OpenSSH (a listener
#         per host, then every pair connecting, in parallel), and what it adds to fleet check
#   net:  fleet-train's measured all-reduce vs `fleet net`'s estimate and PyTorch's own Gloo
#         all-reduce on shaped links (scripts/bench-net.sh)
#
#   SECTIONS="sync run" scripts/bench.sh   runs only those sections
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-20}
SYNC_ROUNDS=${SYNC_ROUNDS:-3}
CHECK_ROUNDS=${CHECK_ROUNDS:-10}
SECTIONS=" ${SECTIONS:-exec sync run check train net} "
want() { [[ $SECTIONS == *" $1 "* ]]; }
NOISE=${NOISE:-1.25}
compared=()

# against_docs ROW RATIO: RATIO (fleet / alternative, this run) beside the ratio of the row of
# docs/benchmarks.md's table that begins with ROW.
against_docs() {
  local recorded verdict
  recorded=$(grep -F -- "| $1" docs/benchmarks.md | head -n 1 | awk -F'|' '{ gsub(/[ x]/, "", $5); print $5 }')
  [[ -n $recorded ]] || { echo "bench: no row '$1' in docs/benchmarks.md" >&2; exit 1; }
  verdict=$(awk -v now="$2" -v was="$recorded" -v noise="$NOISE" 'BEGIN { print (now > was * noise) ? "REGRESSION" : "ok" }')
  compared+=("$(printf '%-52s recorded %5.2fx   now %5.2fx   %s' "$1" "$recorded" "$2" "$verdict")")
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

scripts/setup.sh
# FLEET=path/to/fleet measures another build (an older commit's, to find a regression).
if [[ -z ${FLEET:-} ]]; then cargo build --release --locked --quiet; fi
fleet=${FLEET:-$PWD/target/release/fleet}

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

if want exec; then
  fleet_ms=$(median_ms fleet_exec)
  ssh_ms=$(median_ms openssh_exec)
  printf 'exec on %d hosts (median of %d): fleet %s ms, OpenSSH ssh in parallel %s ms, ratio ssh/fleet %.1fx\n' \
    "${#hosts[@]}" "$ROUNDS" "$fleet_ms" "$ssh_ms" "$(awk -v a="$ssh_ms" -v b="$fleet_ms" 'BEGIN { print a / b }')"
  against_docs '`fleet exec -- true` on 3 hosts' "$(ratio "$fleet_ms" "$ssh_ms")"
fi

# ---- sync ------------------------------------------------------------------------------------
work=/tmp/fleet-bench
rm -rf "$work"
mkdir -p "$work"
export XDG_CACHE_HOME=$work/cache

# make_tree DIR FILES SIZE: FILES files of SIZE bytes in 20 folders, dated an hour ago.
make_tree() {
  local dir=$1 n=$2 size=$3 i
  mkdir -p "$dir"
  head -c $((n * size)) /dev/urandom >"$work/blob"
  for ((i = 0; i < 20; i++)); do mkdir -p "$dir/part$i"; done
  for ((i = 0; i < n; i++)); do
    dd if="$work/blob" of="$dir/part$((i % 20))/file$i.bin" bs="$size" skip="$i" count=1 status=none
  done
  rm "$work/blob"
  find "$dir" -exec touch -d '1 hour ago' {} +
}

# sync_inventory SOURCE NAME: an inventory syncing SOURCE to $work/NAME/<host>.
sync_inventory() {
  sed -e "s|^workdir = \"$TB_DIR/work/\(host[0-9]*\)\"|workdir = \"$work/$2/\\1\"|" \
    -e "s|^master_port = 29500|master_port = 29500\n[sync]\nsource = \"$1\"|" "$TB_DIR/fleet.toml" >"$work/$2.toml"
  echo "$work/$2.toml"
}

rsync_all() { # SOURCE NAME
  local h pids=()
  for h in "${hosts[@]}"; do
    rsync -a --mkpath --delete -e "ssh -F $TB_DIR/ssh_config" "$1/" "$h:$work/$2/$h/" & pids+=($!)
  done
  for h in "${pids[@]}"; do wait "$h"; done
}

# once_ms CMD...: wall time of one run in milliseconds.
once_ms() {
  local start end
  start=$(date +%s%N)
  "$@" >/dev/null 2>&1 || { echo "bench: '$*' failed" >&2; exit 1; }
  end=$(date +%s%N)
  echo $(((end - start) / 1000000))
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

report() { # CASE FLEET_MS RSYNC_MS DOCS_ROW
  printf 'sync %-32s fleet %6s ms   rsync %6s ms   fleet/rsync %.2fx\n' "$1" "$2" "$3" "$(awk -v a="$2" -v b="$3" 'BEGIN { print a / b }')"
  against_docs "$4" "$(ratio "$2" "$3")"
}

if want sync; then
echo "bench: making the trees" >&2
make_tree "$work/small" 2000 20000
head -c $((150 << 20)) /dev/urandom | base64 -w 99 >"$work/small/training_data.csv" # 200 MB of text
touch -d '1 hour ago' "$work/small/training_data.csv"
make_tree "$work/many" 10000 1000
# Each cold round writes to folders never used before, and the two tools take turns going first:
# ext4 makes the first files created right after a mass delete (the previous round's) pay for
# skipping the inodes it just freed, which would tax whichever tool ran first.
cold_fleet=() cold_rsync=()
for ((r = 0; r < SYNC_ROUNDS; r++)); do
  rm -rf "$XDG_CACHE_HOME"
  small_inv=$(sync_inventory "$work/small" "fleet-small-$r")
  if ((r % 2 == 0)); then
    cold_fleet+=("$(once_ms "$fleet" -i "$small_inv" sync)")
    cold_rsync+=("$(once_ms rsync_all "$work/small" "rsync-small-$r")")
  else
    cold_rsync+=("$(once_ms rsync_all "$work/small" "rsync-small-$r")")
    cold_fleet+=("$(once_ms "$fleet" -i "$small_inv" sync)")
  fi
done
report "(a) cold, 2000 files + 200 MB" "$(printf '%s\n' "${cold_fleet[@]}" | median)" "$(printf '%s\n' "${cold_rsync[@]}" | median)" "sync, cold"

warm_fleet=() warm_rsync=()
for ((r = 0; r < SYNC_ROUNDS; r++)); do
  warm_fleet+=("$(once_ms "$fleet" -i "$small_inv" sync)")
  warm_rsync+=("$(once_ms rsync_all "$work/small" "rsync-small-$((SYNC_ROUNDS - 1))")")
done
report "(b) warm, nothing changed" "$(printf '%s\n' "${warm_fleet[@]}" | median)" "$(printf '%s\n' "${warm_rsync[@]}" | median)" "sync, warm"

many_inv=$(sync_inventory "$work/many" fleet-many)
"$fleet" -i "$many_inv" sync >/dev/null 2>&1
rsync_all "$work/many" rsync-many
one_fleet=() one_rsync=()
for ((r = 0; r < SYNC_ROUNDS; r++)); do
  echo "change $r" >>"$work/many/part7/file4567.bin"
  one_fleet+=("$(once_ms "$fleet" -i "$many_inv" sync)")
  one_rsync+=("$(once_ms rsync_all "$work/many" rsync-many)")
done
report "(c) 1 changed among 10,000" "$(printf '%s\n' "${one_fleet[@]}" | median)" "$(printf '%s\n' "${one_rsync[@]}" | median)" "sync, 1 file changed"
fi

# ---- run -------------------------------------------------------------------------------------
if want run; then
mkdir -p "$work/job"
echo job >"$work/job/README"
job_inv=$(sync_inventory "$work/job" fleet-job)
"$fleet" -i "$job_inv" sync >/dev/null 2>&1
stamps=$work/stamps
mkdir -p "$stamps"

# started_ms CMD...: ms from now until the last rank wrote its start stamp.
started_ms() {
  rm -f "$stamps"/*
  local t0 last
  t0=$(date +%s%N)
  "$@" >/dev/null 2>&1 || { echo "bench: '$*' failed" >&2; exit 1; }
  last=$(cat "$stamps"/* | sort -n | tail -n 1)
  echo $(((last - t0) / 1000000))
}
stamp='date +%s%N > '"$stamps"'/$RANK'
fleet_start() { "$fleet" -i "$job_inv" run --no-sync --no-check -- sh -c "$stamp"; }
openssh_start() {
  local i=0 h pids=()
  for h in "${hosts[@]}"; do
    ssh -F "$TB_DIR/ssh_config" "$h" "cd $work/fleet-job/$h && RANK=$i sh -c '$stamp'" & pids+=($!)
    i=$((i + 1))
  done
  for h in "${pids[@]}"; do wait "$h"; done
}
start_fleet=() start_ssh=()
for ((r = 0; r < SYNC_ROUNDS; r++)); do
  start_fleet+=("$(started_ms fleet_start)")
  start_ssh+=("$(started_ms openssh_start)")
done
f=$(printf '%s\n' "${start_fleet[@]}" | median)
o=$(printf '%s\n' "${start_ssh[@]}" | median)
printf 'run  %-32s fleet %6s ms   ssh   %6s ms   fleet/ssh   %.2fx\n' "all 3 ranks started" "$f" "$o" "$(ratio "$f" "$o")"
against_docs "run: all 3 ranks started" "$(ratio "$f" "$o")"

lines_fleet() { [ "$("$fleet" -i "$job_inv" run --no-sync --no-check -- seq 200000 2>/dev/null | wc -l)" = 600000 ]; }
lines_ssh() {
  local h
  for h in "${hosts[@]}"; do ssh -F "$TB_DIR/ssh_config" "$h" seq 200000 & done | wc -l | grep -qx 600000
}
log_fleet=() log_ssh=()
for ((r = 0; r < SYNC_ROUNDS; r++)); do
  log_fleet+=("$(once_ms lines_fleet)")
  log_ssh+=("$(once_ms lines_ssh)")
done
f=$(printf '%s\n' "${log_fleet[@]}" | median)
o=$(printf '%s\n' "${log_ssh[@]}" | median)
printf 'run  %-32s fleet %6s ms   ssh   %6s ms   fleet/ssh   %.2fx   (fleet %.0f lines/s)\n' "600,000 merged log lines" "$f" "$o" \
  "$(awk -v a="$f" -v b="$o" 'BEGIN { print a / b }')" "$(awk -v a="$f" 'BEGIN { print 600000 / (a / 1000) }')"
against_docs "run: 3 x 200,000 lines merged" "$(ratio "$f" "$o")"
fi

# ---- check -----------------------------------------------------------------------------------
if want check; then
mkdir -p "$work/checked"
echo job >"$work/checked/README"
check_inv=$(sync_inventory "$work/checked" fleet-check)
"$fleet" -i "$check_inv" sync >/dev/null 2>&1
mapfile -t addrs < <(cut -f2 "$TB_DIR/hosts.tsv")
n=${#hosts[@]}
# The same test by hand: each host listens on a port its kernel picks (and takes n-1
# connections), then every host connects to every other, all at once.
listen_py="import socket; s = socket.socket(); s.bind((\"0.0.0.0\", 0)); s.listen(16); print(s.getsockname()[1], flush=True); [s.accept()[0].close() for _ in range($((n - 1)))]"
connect_py='import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3).close()'
openssh_pairs() {
  local i j pids=() listeners=() port
  rm -rf "$work/ports" && mkdir -p "$work/ports"
  for ((j = 0; j < n; j++)); do
    ssh -F "$TB_DIR/ssh_config" "${hosts[j]}" "python3 -c '$listen_py'" >"$work/ports/$j" & listeners+=($!)
  done
  for ((j = 0; j < n; j++)); do
    until [[ -s $work/ports/$j ]]; do sleep 0.001; done
  done
  for ((i = 0; i < n; i++)); do
    for ((j = 0; j < n; j++)); do
      ((i != j)) || continue
      port=$(head -n 1 "$work/ports/$j")
      ssh -F "$TB_DIR/ssh_config" "${hosts[i]}" "python3 -c '$connect_py' ${addrs[j]} $port" & pids+=($!)
    done
  done
  for i in "${pids[@]}" "${listeners[@]}"; do wait "$i"; done
}
pairs_fleet=() pairs_ssh=() check_total=()
for ((r = 0; r < CHECK_ROUNDS; r++)); do
  start=$(date +%s%N)
  line=$("$fleet" -v -i "$check_inv" check 2>&1 >/dev/null | grep 'between hosts: .* connections in') ||
    { echo "bench: fleet check failed or printed no pairs timing" >&2; exit 1; }
  check_total+=($((($(date +%s%N) - start) / 1000000)))
  pairs_fleet+=("$(sed 's/.* connections in \([0-9]*\) ms.*/\1/' <<<"$line")")
  pairs_ssh+=("$(once_ms openssh_pairs)")
done
f=$(printf '%s\n' "${pairs_fleet[@]}" | median)
o=$(printf '%s\n' "${pairs_ssh[@]}" | median)
t=$(printf '%s\n' "${check_total[@]}" | median)
printf 'check %-31s fleet %6s ms   ssh   %6s ms   fleet/ssh   %.2fx   (median of %d; fleet check in all %s ms, the pairs beside the probe)\n' \
  "$((n * (n - 1))) connections between hosts" "$f" "$o" "$(awk -v a="$f" -v b="$o" 'BEGIN { print a / b }')" "$CHECK_ROUNDS" "$t"
fi

rm -rf "$work"
scripts/testbed.sh down
trap - EXIT

if ((${#compared[@]})); then
  echo "against docs/benchmarks.md (fleet / alternative; a regression is over ${NOISE}x the recorded ratio):"
  printf '  %s\n' "${compared[@]}"
fi

# ---- train and net ---------------------------------------------------------------------------
if want train; then scripts/bench-train.sh; fi
if want net; then scripts/bench-net.sh; fi
if printf '%s\n' "${compared[@]}" | grep -q REGRESSION; then exit 1; fi
