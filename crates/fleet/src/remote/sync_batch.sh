# shellcheck shell=sh
# sync_batch.sh ROOT OP: one operation on many paths of the workdir ROOT, read from stdin as a
# NUL-separated list: "remove" (rm -rf), "mkdir" (mkdir -p) or "link" (pairs TARGET, PATH); or
# "flush": the workdir's file system written to disk (syncfs), so that files renamed into place
# next never turn out empty after a crash.
cd -- "$1" || exit 1
case $2 in
  remove) xargs -0 -r rm -rf -- ;;
  mkdir) xargs -0 -r mkdir -p -- ;;
  link) xargs -0 -r -n 2 sh -c 'ln -sfn -- "$0" "$1"' ;;
  flush) sync -f . 2>/dev/null || sync ;;
  *) echo "sync_batch.sh: unknown operation $2" >&2; exit 2 ;;
esac
