# shellcheck shell=sh
# interface.sh ADDR: the name of this host's interface that reaches ADDR (net_lib.sh's
# interface_to). Prints nothing when there is none.
interface_to "$1"
