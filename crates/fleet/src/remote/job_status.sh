# shellcheck shell=sh
# job_status.sh WORKDIR [JOB | --all]: the jobs of a workdir: JOB, the last ten with --all, or
# the current one. Prints "job ID DIR" (DIR absolute), then "STEM STATE" per process (state).
enter_workdir "$1" 2>/dev/null || exit 0
cd .fleet 2>/dev/null || exit 0
case ${2-} in
  --all) jobs=$(ls -1 jobs 2>/dev/null | tail -n 10) ;;
  "") jobs=$(cat current-job 2>/dev/null) ;;
  *) jobs=$2 ;;
esac
for j in $jobs; do
  [ -d "jobs/$j" ] || continue
  printf 'job %s %s\n' "$j" "$(cd "jobs/$j" && pwd -P)"
  for f in "jobs/$j"/*.start; do
    [ -e "$f" ] || continue
    stem=${f%.start}
    stem=${stem##*/}
    printf '%s %s\n' "$stem" "$(state "jobs/$j" "$stem")"
  done
done
