# netperf.sh NETPERF_PY ARG...: runs fleet net's link probe with ARGs (serve ... or measure ...).
py=$1
shift
exec python3 -c "$py" "$@"
