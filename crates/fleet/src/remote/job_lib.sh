# shellcheck shell=sh
# job_lib.sh: how a job's processes are found on a host.
#
# Every process of a job carries FLEET_JOB_ID and FLEET_PROCESS (its file stem, rank-3 or node-1)
# in its environment, and so does everything it starts: a torchrun worker in a session of its
# own, a daemon that left its process group. /proc/PID/environ is what a process was started
# with, readable by its own user, and a pid reused by another program does not carry the mark.
# The wrapper of a process does not carry it (it never exports the values), so it can look for
# its process's descendants without finding itself.

# marked_pids JOB STEM: the pids of the processes marked as STEM of JOB, one per line.
marked_pids() {
  # shellcheck disable=SC2046 # one word per pid folder, which hold no spaces
  grep -l -s -z -x -F -e "FLEET_JOB_ID=$1" /proc/[0-9]*/environ |
    while IFS= read -r f; do
      if grep -q -s -z -x -F -e "FLEET_PROCESS=$2" "$f"; then
        p=${f#/proc/}
        echo "${p%/environ}"
      fi
    done
}

# starttime PID: when the process started, in clock ticks since boot (field 22 of
# /proc/PID/stat); fails once it is gone. With the boot id, it tells a pid apart from a later
# process that got the same number.
starttime() {
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  # Fields after the command name, which is in parentheses and may hold spaces.
  # shellcheck disable=SC2086
  set -- ${stat##*) }
  shift 19
  echo "$1"
}

# boot_id: this boot of the host.
boot_id() {
  cat /proc/sys/kernel/random/boot_id 2>/dev/null
}

# state JOBDIR STEM: "exited N", "running" (its wrapper or any marked process lives), or "lost"
# (neither, with no exit recorded; also every unfinished process of an earlier boot).
state() {
  s=$1/$2
  if [ -e "$s.exit" ]; then
    echo "exited $(cat "$s.exit")"
    return
  fi
  if [ "$(cat "$1/boot_id" 2>/dev/null)" = "$(boot_id)" ]; then
    if [ -s "$s.wrapper" ] && read -r wpid wstart <"$s.wrapper" && [ "$(starttime "$wpid")" = "$wstart" ]; then
      echo running
      return
    fi
    if [ -n "$(marked_pids "${1##*/}" "$2")" ]; then
      echo running
      return
    fi
  fi
  # The wrapper may have written the exit and ended since the first look.
  if [ -e "$s.exit" ]; then
    echo "exited $(cat "$s.exit")"
    return
  fi
  echo lost
}
