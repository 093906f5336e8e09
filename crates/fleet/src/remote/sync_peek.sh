# shellcheck shell=sh
# sync_peek.sh WORKDIR MANIFEST: the workdir's state (print_state) without taking the sync lock;
# nothing at all when there is no workdir yet.
enter_workdir "$1" 2>/dev/null || exit 0
print_state "$2" ""
