# shellcheck shell=sh
# job_start.sh WORKDIR JOB MASTER STEM...: starts this host's processes of JOB, each by a
# detached wrapper (job_wrapper.sh). stdin holds, each as a decimal length on its own line then
# that many bytes: the wrapper, then per STEM its environment file (exports, then `set --` with
# its command), which reaches the host's disk as a 0600 file and never a command line. The
# processes find the name of the interface that reaches MASTER in $FLEET_IFACE (empty when
# none does), for their Gloo and NCCL.
# Prints "busy JOB" (exit 75) while another job runs in WORKDIR, "no workdir" (exit 70) when it
# is missing, and "started ROOT" (the workdir's absolute path, for SFTP) once every wrapper is
# off.
umask 077
enter_workdir "$1" 2>/dev/null || { echo "no workdir"; exit 70; }
job=$2
master=$3
shift 3
mkdir -p .fleet || exit 1
exec 9>>.fleet/job.lock
if ! flock -n -x 9; then
  printf 'busy %s\n' "$(cat .fleet/current-job 2>/dev/null)"
  exit 75
fi
dir=.fleet/jobs/$job
mkdir -p -- "$dir" && chmod 700 .fleet/jobs "$dir" || exit 1
printf '%s\n' "$job" >.fleet/current-job
boot_id >"$dir/boot_id"

# read_block: a decimal length on its own line, then that many bytes, to stdout.
read_block() {
  IFS= read -r n && [ -n "$n" ] && head -c "$n"
}
read_block >"$dir/wrapper.sh" || exit 1
for stem; do
  read_block >"$dir/$stem.env" || exit 1
done
# The wrappers hold the lock shared while they live, which refuses a second job.
flock -s 9
FLEET_IFACE=$(interface_to "$master")
export FLEET_IFACE
for stem; do
  setsid -f sh "$dir/wrapper.sh" "$dir/$stem" </dev/null >/dev/null 2>&1
done
printf 'started %s\n' "$(pwd -P)"
