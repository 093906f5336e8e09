# shellcheck shell=sh
# job_signal.sh WORKDIR JOB SIGNAL STEM...: sends SIGNAL to every process of the STEMs of JOB that
# have not ended, wherever they went (marked_pids), on this boot of the host only. A process
# still starting (no .pid yet) is waited for briefly.
enter_workdir "$1" 2>/dev/null || exit 0
job=$2
sig=$3
shift 3
dir=.fleet/jobs/$job
[ -d "$dir" ] || exit 0
[ "$(cat "$dir/boot_id" 2>/dev/null)" = "$(boot_id)" ] || exit 0
# A wrapper that has not started its command yet finds this and does not start it.
: >"$dir/stopping"
for stem; do
  s=$dir/$stem
  [ -e "$s.exit" ] && continue
  n=0
  while [ ! -s "$s.pid" ] && [ ! -e "$s.exit" ] && [ $n -lt 50 ]; do
    sleep 0.1
    n=$((n + 1))
  done
  for pid in $(marked_pids "$job" "$stem"); do
    kill "-$sig" "$pid" 2>/dev/null
  done
done
exit 0
