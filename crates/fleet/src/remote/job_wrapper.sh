# shellcheck shell=sh
# job_wrapper.sh STEM: runs one process of a job and records how it ended, in the workdir. STEM
# is its path without extension in the job folder: STEM.env (read and removed), .log (its
# output), .wrapper (this wrapper's pid and start time), .start (when it started, ns), .pid (its
# process group), .exit (how it ended, written once every process it left behind is gone too).
umask 077
s=$1
echo "$$ $(starttime $$)" >"$s.wrapper"
date +%s%N >"$s.start"
# The job was stopped before this process started (a signal found nothing of it to stop).
if [ -e "${s%/*}/stopping" ]; then
  rm -f -- "$s.env"
  : >"$s.log"
  echo 143 >"$s.exit.tmp" && mv -f "$s.exit.tmp" "$s.exit"
  exit 0
fi
# The command runs in its own session and process group, with the environment only it sees.
# shellcheck disable=SC2016 # expanded by that inner sh
setsid -w sh -c '. "./$0.env" && rm -f -- "$0.env" || exit 126
echo $$ >"$0.pid"
if ! command -v "$1" >/dev/null 2>&1; then
  case $1 in
    */*) ;;
    *) if [ -f "./$1" ]; then
      printf "fleet: %s: not found on the PATH of this host, but the workdir has ./%s: start it as ./%s\n" "$1" "$1" "$1" >&2
      exit 127
    fi ;;
  esac
  printf "fleet: %s: not found on this host (PATH=%s); set activate = \"...\" in the inventory to the line that provides it (a venv, conda, module load)\n" "$1" "$PATH" >&2
  exit 127
fi
exec "$@"' "$s" </dev/null >"$s.log" 2>&1 9>&- &
wait $!
code=$?
# Descendants may outlive the command (torchrun's workers have sessions of their own): the
# process has not ended while one of them lives.
job=${s%/*}
job=${job##*/}
# A process in the middle of an exec can read as unmarked for an instant: gone means unseen on
# two looks a moment apart.
gone() {
  [ -z "$(marked_pids "$job" "${s##*/}")" ] && sleep 0.1 && [ -z "$(marked_pids "$job" "${s##*/}")" ]
}
until gone; do
  sleep 0.2
done
echo "$code" >"$s.exit.tmp" && mv -f "$s.exit.tmp" "$s.exit"
