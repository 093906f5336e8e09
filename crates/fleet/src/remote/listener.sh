# shellcheck shell=sh
# listener.sh PORT SECONDS LISTENER_PY: the listening side of the port checks (PORT 0: one the
# kernel picks). Prints "in use HOLDER" when PORT is taken, "no python3" without one, else what
# listener.py prints.
if [ "$1" != 0 ] && ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; then
  echo "in use $(ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'users:(("[^"]*"' | head -n 1 | cut -d'"' -f2)"
  exit 0
fi
command -v python3 >/dev/null 2>&1 || { echo 'no python3'; exit 0; }
exec python3 -S -c "$3" "$1" "$2"
