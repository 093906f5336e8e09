# shellcheck shell=sh
# pull_list.sh WORKDIR PATH...: for `fleet pull`, the workdir's absolute path on a line, then
# the SHA-256 and name of every regular file under each PATH (relative to the workdir) as
# `sha256sum -z` writes them: `HASH  ./PATH/FILE` and a NUL, any name as it is. A PATH that is
# not there is named on stderr, one per line, and the script ends with 3 before hashing.
enter_workdir "$1" || exit 1
shift
missing=0
for path in "$@"; do
  if [ ! -e "./$path" ]; then
    printf '%s\n' "$path" >&2
    missing=1
  fi
done
[ "$missing" = 0 ] || exit 3
pwd -P
for path in "$@"; do
  find "./$path" -type f -print0
done | xargs -0 -r sha256sum -z --
