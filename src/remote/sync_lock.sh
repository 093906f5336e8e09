# sync_lock.sh WORKDIR MANIFEST HEADER: creates WORKDIR if needed and takes its sync lock, waiting
# up to 10 minutes (printing "busy" once if it has to); then prints "locked ROOT" and the state
# (print_state), and holds the lock until stdin closes, so a laptop that vanishes releases it.
# shellcheck disable=SC2154 # $workdir is set by workdir_of (prelude.sh)
workdir_of "$1"
{ [ -d "$workdir/.fleet" ] || mkdir -p -- "$workdir/.fleet"; } && cd -- "$workdir" || exit 1
{
  flock -n 9 || { echo busy; flock -w 600 9; } || exit 75
  printf 'locked '
  pwd -P
  print_state "$2" "$3"
  exec cat >/dev/null
} 9>.fleet/sync.lock
