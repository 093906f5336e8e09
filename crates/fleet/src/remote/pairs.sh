# shellcheck shell=sh
# pairs.sh SECONDS PAIRS_PY [INDEX ADDR PORT]...: the connecting side of fleet check's check
# between hosts: connects to every ADDR:PORT at once and prints "INDEX ok", "INDEX refused",
# "INDEX timeout" or "INDEX error WHY" for each; "no python3" without one.
command -v python3 >/dev/null 2>&1 || { echo 'no python3'; exit 0; }
seconds=$1 script=$2
shift 2
exec python3 -S -c "$script" "$seconds" "$@"
