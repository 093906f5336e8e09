# shellcheck shell=sh
# prelude.sh: read by sh before every script fleet runs on a host.

# workdir_of DIR: sets $workdir to DIR, where "~" and a leading "~/" mean the login's home (as
# in the inventory's workdir).
workdir_of() {
  # shellcheck disable=SC2088 # a literal "~" is what is matched
  case $1 in
    "~" | "~/") workdir=$HOME ;;
    "~/"*) workdir=$HOME/${1#"~/"} ;;
    *) workdir=$1 ;;
  esac
}

# enter_workdir DIR: cd into DIR (see workdir_of).
enter_workdir() {
  workdir_of "$1" && cd -- "$workdir" || return
}

# activate LINE: runs the inventory's activate line (a venv, conda's hook, module load) in this
# shell, so what follows sees its PATH and variables; nothing when LINE is empty. On failure it
# says so on stderr, after what the line printed there itself.
activate() {
  [ -n "$1" ] || return 0
  # `command` keeps a failing special builtin (`. missing-file`) from ending the shell.
  command eval "$1" || {
    s=$?
    printf 'fleet: activate = "%s" failed (exit %s)\n' "$1" "$s" >&2
    return 1
  }
}
