# shellcheck shell=sh
# sync_lock.sh WORKDIR MANIFEST HEADER ADOPT: creates WORKDIR if needed and takes its sync lock,
# waiting up to 10 minutes (printing "busy" once if it has to); then prints "locked ROOT", "job
# ID" (the job running there, or "job " when none) and the state (print_state), and holds the
# lock until stdin closes, so a laptop that vanishes releases it.
# Refused: a workdir that is /, the home directory or a folder above it ("unsafe ROOT", exit
# 77), and unless ADOPT is 1 one that exists, holds files and was never fleet's (no .fleet
# folder: "foreign", exit 76).
# shellcheck disable=SC2154 # $workdir is set by workdir_of (prelude.sh)
workdir_of "$1"
if [ -d "$workdir" ]; then
  root=$(cd -- "$workdir" && pwd -P) || exit 1
  home=$(cd -- "$HOME" 2>/dev/null && pwd -P)
  case $root in
    /) echo "unsafe $root"; exit 77 ;;
  esac
  case $home/ in
    "$root"/*) echo "unsafe $root"; exit 77 ;;
  esac
  if [ ! -d "$workdir/.fleet" ] && [ "$4" != 1 ] && [ -n "$(ls -A -- "$workdir")" ]; then
    echo foreign
    exit 76
  fi
fi
{ [ -d "$workdir/.fleet" ] || mkdir -p -- "$workdir/.fleet"; } && cd -- "$workdir" || exit 1
{
  flock -n 9 || { echo busy; flock -w 600 9; } || exit 75
  printf 'locked '
  pwd -P
  running=
  if [ -e .fleet/job.lock ] && ! flock -n -x .fleet/job.lock true; then
    running=$(cat .fleet/current-job 2>/dev/null)
    [ -n "$running" ] || running=unknown
  fi
  printf 'job %s\n' "$running"
  print_state "$2" "$3"
  exec cat >/dev/null
} 9>.fleet/sync.lock
