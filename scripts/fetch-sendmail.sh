#!/usr/bin/env bash
# Fetch Debian's sendmail and unpack it into a private directory, without
# installing it: sendmail-bin conflicts with postfix, which the other tests
# need. Used by test/helpers/sendmail.ts (which calls this script when the
# directory is missing) and by .ci/run.
#
#   scripts/fetch-sendmail.sh [DIR]     (default: $NODEMILTER_SENDMAIL_DIR or
#                                        $TMPDIR/nodemilter-sendmail)
#
# Result: DIR/root/usr/libexec/sendmail/sendmail (setgid bit dropped so that
# LD_LIBRARY_PATH works), the m4 files in DIR/root/usr/share/sendmail/cf,
# m4 itself and the two libraries sendmail needs that a postfix machine lacks
# (libwrap0, liblockfile1), and DIR/root/.complete. `apt-get download` reads
# apt's package lists: run `apt-get update` first on a fresh machine.
set -euo pipefail
dir="${1:-${NODEMILTER_SENDMAIL_DIR:-${TMPDIR:-/tmp}/nodemilter-sendmail}}"
pkgs=(sendmail-bin sendmail-base sendmail-cf m4 libwrap0 liblockfile1)

if [ -f "$dir/root/.complete" ]; then
  echo "sendmail already unpacked in $dir/root"
  exit 0
fi
mkdir -p "$dir/debs"
rm -rf "$dir/root.tmp"
mkdir -p "$dir/root.tmp"
cd "$dir/debs"
# apt-get download writes into the current directory; as root it warns that
# the _apt user cannot write there, which is harmless.
if ! apt-get download -q "${pkgs[@]}" 2>&1 | grep -v "Download is performed unsandboxed"; then :; fi
for p in "${pkgs[@]}"; do
  deb=$(ls -t "$p"_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    echo "fetch-sendmail: could not download $p (run apt-get update first?)" >&2
    exit 1
  fi
  dpkg-deb -x "$deb" "$dir/root.tmp"
done
# The binary is setgid smmsp/mail: the dynamic loader would then ignore
# LD_LIBRARY_PATH (secure execution), and we run it as root anyway.
chmod g-s "$dir/root.tmp/usr/libexec/sendmail/sendmail"
touch "$dir/root.tmp/.complete"
rm -rf "$dir/root"
mv "$dir/root.tmp" "$dir/root"
echo "sendmail unpacked in $dir/root"
