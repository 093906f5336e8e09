# shellcheck shell=sh
# netperf.sh ACTIVATE NETPERF_PY ARG...: runs fleet net's link probe with ARGs (serve ... or
# measure ...), with the python3 the ACTIVATE line provides.
activate "$1" || exit 126
py=$2
shift 2
exec python3 -c "$py" "$@"
