# shellcheck shell=sh
# exec.sh LINE ACTIVATE: fleet exec's command. After the ACTIVATE line (see activate), runs the
# shell line LINE in a session and process group of its own (stdin from /dev/null) and passes on
# its exit status. fleet holds this script's stdin open while it waits, so end of file there
# means fleet went away (Ctrl-C, a lost laptop): the command's whole group then gets SIGTERM, as
# a terminal's would get SIGHUP.
activate "$2" || exit 126
setsid -w sh -c "$1" </dev/null &
pid=$!
# A command started with & reads /dev/null unless told otherwise: the watcher is given this
# script's stdin by name.
exec 3<&0
# shellcheck disable=SC2016 # expanded by that sh
sh -c 'cat >/dev/null; kill -TERM -"$1"' watcher "$pid" <&3 >/dev/null 2>&1 &
exec 3<&-
watcher=$!
wait "$pid"
code=$?
kill "$watcher" 2>/dev/null
# A command killed by a signal is reported the same way, as the host's sshd would have.
if [ "$code" -gt 128 ] && [ "$code" -lt 160 ]; then
  trap - "$((code - 128))"
  kill "-$((code - 128))" $$
fi
exit "$code"
