# shellcheck shell=sh
# interface.sh ADDR: the name of this host's interface that reaches ADDR (an address or a host
# name): the one holding it, else the route's device. Prints nothing when there is none.
a=$1
case $a in
  *[!0-9.:]*) a=$(getent hosts "$a" | awk '{print $1; exit}') ;;
esac
i=$(ip -o addr show to "$a" 2>/dev/null | awk '{print $2; exit}')
[ -n "$i" ] || i=$(ip -o route get "$a" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
printf '%s' "$i"
