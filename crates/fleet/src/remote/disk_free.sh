# shellcheck shell=sh
# disk_free.sh WORKDIR: KiB free on the disk that holds WORKDIR.
# shellcheck disable=SC2154 # $workdir is set by workdir_of (prelude.sh)
workdir_of "$1"
df -Pk -- "$workdir" | awk 'NR==2 {print $4}'
