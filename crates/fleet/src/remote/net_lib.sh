# shellcheck shell=sh
# net_lib.sh: how a host reaches another.

# interface_to ADDR: the name of this host's interface that reaches ADDR (an address or a host
# name): the one holding it, else the route's device. Prints nothing when there is none.
interface_to() {
  to=$1
  case $to in
    *[!0-9.:]*) to=$(getent hosts "$to" | awk '{print $1; exit}') ;;
  esac
  via=$(ip -o addr show to "$to" 2>/dev/null | awk '{print $2; exit}')
  [ -n "$via" ] || via=$(ip -o route get "$to" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
  printf '%s' "$via"
}
