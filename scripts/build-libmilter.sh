#!/usr/bin/env bash
# Builds libmilter as a position-independent static archive from Debian's
# sendmail source with native/libmilter/odd-macros.patch applied, for the
# prebuild (scripts/prebuild.js links it when it is there).
#
#   scripts/build-libmilter.sh [SRC_DIR] [OUT_DIR]
#
# SRC_DIR holds Debian's sendmail_<version>.dsc with the files it names
# (orig tarball, debian tarball); without it (or given as "") the source is
# fetched with `apt-get source --download-only sendmail` into a scratch
# directory, using
# a deb-src entry for Debian bookworm written into that scratch directory
# (the machine's apt configuration is not changed). OUT_DIR (default
# libmilter-build/, git-ignored; not under build/, which node-gyp rebuild
# removes) receives libmilter.a and VERSION, the line the prebuild
# records in nodemilter.json.
#
# dpkg-source -x checks the files against the .dsc's checksums and applies
# Debian's patches; then our patch. Only libmilter is compiled, with the
# compile-time settings Debian's libmilter-dev is built with (debian/rules,
# debian/configure.ac, debian/build/site.config.m4.in, upstream's
# libmilter/Makefile.m4 and devtools/OS/Linux), with gcc directly instead of
# sendmail's m4-based Build (which needs m4 and a configure run). The
# script then compares the archive's defined global symbols with those of
# the system's libmilter.a when there is one: they must be the same but for
# the patch's marker, mi_macros_paired.
#
# For tests (test/libmilter-patch.test.ts) and sanitizer runs
# (scripts/test-asan.sh):
#   NODEMILTER_LIBMILTER_CFLAGS  extra compiler flags (e.g. -fsanitize=address)
#   NODEMILTER_LIBMILTER_NOPATCH=1  leave the patch out: Debian's libmilter
#                                as is, the control that shows the bug
#
# Exit status 2: the source could not be had (apt could not fetch it, or
# SRC_DIR holds no .dsc); tests skip on that.
set -euo pipefail
for tool in dpkg-source dpkg-buildflags patch gcc ar nm; do
  command -v "$tool" >/dev/null || {
    echo "build-libmilter: needs $tool (Debian: apt-get install dpkg-dev gcc; scripts/system-packages.txt)" >&2
    exit 1
  }
done
root="$(cd "$(dirname "$0")/.." && pwd)"
src_in="${1:-}"
out="${2:-$root/libmilter-build}"
patch_file="$root/native/libmilter/odd-macros.patch"
work="$(mktemp -d /tmp/nodemilter-libmilter.XXXXXX)"
trap 'rm -rf "$work"' EXIT

if [ -z "$src_in" ]; then
  src_in="$work/download"
  mkdir -p "$src_in" "$work/apt/lists/partial" "$work/apt/sources"
  cat >"$work/apt/sources/debian-src.sources" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  aptopts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$work/apt/sources"
    -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache" -o "Debug::NoLocking=1")
  echo "== fetching Debian's sendmail source with apt"
  if ! apt-get "${aptopts[@]}" update >"$work/apt.log" 2>&1 ||
    ! (cd "$src_in" && apt-get "${aptopts[@]}" source --download-only sendmail >>"$work/apt.log" 2>&1); then
    tail -5 "$work/apt.log" >&2
    echo "build-libmilter: apt could not fetch Debian's sendmail source" >&2
    exit 2
  fi
fi
dsc="$(ls "$src_in"/sendmail_*.dsc 2>/dev/null | head -1)"
if [ -z "$dsc" ]; then
  echo "build-libmilter: no sendmail_*.dsc in $src_in" >&2
  exit 2
fi
version="$(sed -n 's/^Version: //p' "$dsc")"
echo "== unpacking $(basename "$dsc") (checksums checked, Debian's patches applied)"
dpkg-source -x "$dsc" "$work/src" >"$work/dpkg-source.log" 2>&1 || {
  cat "$work/dpkg-source.log" >&2
  exit 1
}
label="$version + native/libmilter/odd-macros.patch"
if [ "${NODEMILTER_LIBMILTER_NOPATCH:-}" = 1 ]; then
  label="$version (unpatched)"
else
  echo "== applying native/libmilter/odd-macros.patch"
  (cd "$work/src" && patch -p1 --no-backup-if-mismatch <"$patch_file")
fi

lm="$work/src/libmilter"
obj="$work/obj"
mkdir -p "$obj"
# sendmail's Build links include/sm/os/sm_os_<os>.h as sm_os.h in its object
# directory (devtools/OS/Linux: confSM_OS_HEADER sm_os_linux).
ln -s "$work/src/include/sm/os/sm_os_linux.h" "$obj/sm_os.h"
# Debian's flags for the package (dpkg-buildflags, as debhelper passes
# them) plus -fPIC (debian/rules).
read -r -a cflags <<<"$(dpkg-buildflags --get CFLAGS) $(dpkg-buildflags --get CPPFLAGS) -fPIC ${NODEMILTER_LIBMILTER_CFLAGS:-}"
defines=(
  # libmilter/Makefile.m4
  -DNOT_SENDMAIL -Dsm_snprintf=snprintf
  # confMT: devtools/OS/Linux confMTCCOPTS, devtools/M4/UNIX/defines.m4
  -D_REENTRANT -DXP_MT
  # confENVDEF from debian/configure.ac (Linux, IPv6 with gethostbyname2)
  -DHASFCHMOD=1 -DHASSETRLIMIT=1 -DHASFLOCK=1 -DUSESETEUID=1 -DHASGETUSERSHELL=1
  -DHAS_GETHOSTBYNAME2=1 -DNETINET6
  # conf_libmilter_ENVDEF: debian/configure.ac and debian/build/site.config.m4.in
  -DSM_CONF_POLL=1 -D_FFR_MILTER_ROOT_UNSAFE -D_FFR_WORKERS_POOL=1
)
includes=(-I"$obj" -I"$work/src/sendmail" -I"$work/src/include")
# The objects of Debian's libmilter.a, in its order (errstring.c and strl.c
# come from libsm, as in libmilter/Makefile.m4).
sources=(main engine listener worker handler comm smfi signal sm_gethost monitor)
cp "$work/src/libsm/errstring.c" "$work/src/libsm/strl.c" "$lm/"
echo "== compiling libmilter ($label)"
objs=()
# From inside libmilter/ with relative names, as sendmail's Build does: the
# file names that end up in the objects (__FILE__ in assertions) are then
# Debian's; -ffile-prefix-map keeps the scratch path out of the debug info.
cflags+=("-ffile-prefix-map=$work/src=.")
for s in "${sources[@]}" errstring strl; do
  (cd "$lm" && gcc "${cflags[@]}" "${defines[@]}" "${includes[@]}" -c "$s.c" -o "$obj/$s.o")
  objs+=("$obj/$s.o")
done
defined() { nm -g --defined-only "$1" 2>/dev/null | awk 'NF == 3 { print $2, $3 }' | sort -u; }
mkdir -p "$out"
rm -f "$out/libmilter.a"
ar rcs "$out/libmilter.a" "${objs[@]}"
echo "$label" >"$out/VERSION"

if [ "${NODEMILTER_LIBMILTER_NOPATCH:-}" != 1 ] && ! defined "$out/libmilter.a" | grep ' mi_macros_paired$' >/dev/null; then
  echo "build-libmilter: the archive has no mi_macros_paired: the patch did not take" >&2
  exit 1
fi
system=/usr/lib/x86_64-linux-gnu/libmilter.a
[ -e "$system" ] || system="$(gcc -print-file-name=libmilter.a)"
if [ -e "$system" ] && [ "$system" != libmilter.a ]; then
  if ! diff <(defined "$system") <(defined "$out/libmilter.a" | grep -v -e ' mi_macros_paired$' -e ' __odr_asan\.') >"$work/nm.diff"; then
    echo "build-libmilter: the archive's symbols differ from $system:" >&2
    cat "$work/nm.diff" >&2
    exit 1
  fi
  echo "== symbols match $system (plus mi_macros_paired; AddressSanitizer's __odr_asan.* aside)"
fi
echo "built $out/libmilter.a ($(cat "$out/VERSION"))"
