# shellcheck shell=sh
# connect.sh ADDR PORT SECONDS CONNECT_PY: connects to ADDR:PORT within SECONDS; prints ok,
# refused, timeout or "error WHY". Without python3, bash's /dev/tcp does it.
if command -v python3 >/dev/null 2>&1; then
  python3 -c "$4" "$1" "$2" "$3"
elif command -v bash >/dev/null 2>&1; then
  # shellcheck disable=SC2016 # expanded by that bash
  if timeout "$3" bash -c 'exec 3<>"/dev/tcp/$1/$2"' bash "$1" "$2" 2>/dev/null; then
    echo ok
  elif [ $? = 124 ]; then
    echo timeout
  else
    echo refused
  fi
else
  echo 'error no python3 or bash'
fi
