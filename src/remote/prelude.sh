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
