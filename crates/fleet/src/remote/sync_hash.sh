# shellcheck shell=sh
# sync_hash.sh ROOT PLAIN: SHA-256 of files in the workdir ROOT, named on stdin as NUL-separated
# paths: the first PLAIN bytes name files whose names hold no newline or backslash, hashed with
# openssl where it exists (the CPU's SHA instructions: three times sha256sum's speed there);
# the rest, and everything on hosts without openssl, with sha256sum -z, which writes any name
# as it is (openssl escapes those two characters).
cd -- "$1" || exit 1
if command -v openssl >/dev/null 2>&1; then
  head -c "$2" | xargs -0 -r openssl dgst -sha256 -r
else
  head -c "$2" | xargs -0 -r sha256sum -z --
fi
xargs -0 -r sha256sum -z --
