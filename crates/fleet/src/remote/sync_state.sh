# shellcheck shell=sh
# sync_state.sh: print_state MANIFEST HEADER prints, in the workdir, the manifest saved by the
# last verified sync and a stat listing of the tree, each as a decimal length on its own line
# followed by that many bytes. When the manifest's first line is HEADER (fleet's copy has the
# same digest), the line "same" stands for the manifest: the builtin read tells, without
# reading the rest.
print_state() {
  if [ -f "$1" ]; then
    if [ -n "$2" ] && IFS= read -r head <"$1" && [ "$head" = "$2" ]; then
      echo same
    else
      wc -c <"$1"
      cat -- "$1"
    fi
  else
    echo 0
  fi
  listing=.fleet/listing.$$
  find . -mindepth 1 -path ./.fleet -prune -o -printf '%y\0%s\0%T@\0%m\0%P\0%l\0' >"$listing"
  wc -c <"$listing"
  cat -- "$listing"
  rm -f -- "$listing"
}
