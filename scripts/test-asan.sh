#!/usr/bin/env bash
# Runs the native integration tests against an AddressSanitizer + UBSan build
# of the addon, and reports the findings that involve the addon.
# halt_on_error=0 lets a run go on past the first finding: the addon is
# built with -fsanitize-recover=address for that (binding.gyp).
#
# The sanitized addon is built in a scratch directory (the normal build in
# build/ is left alone) and picked up through NODEMILTER_ADDON. Node itself
# is not instrumented, so the ASan runtime is preloaded; leak detection is
# off because Node deliberately leaks at exit (valgrind covers leaks).
#
# With NODEMILTER_LIBMILTER_A=<libmilter.a> the addon links that archive
# statically instead of the system's libmilter.so: a patched libmilter from
# scripts/build-libmilter.sh, built with
# NODEMILTER_LIBMILTER_CFLAGS="-fsanitize=address -fno-omit-frame-pointer" so
# libmilter's own reads are checked too (its findings are inside
# nodemilter.node, so they count).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d /tmp/nodemilter-asan.XXXXXX)"
trap 'rm -rf "$work"' EXIT
cp "$root/binding.gyp" "$work/"
ln -s "$root/native" "$work/native"
ln -s "$root/node_modules" "$work/node_modules"
echo "== building the addon with -fsanitize=address,undefined in $work"
static=0
if [ -n "${NODEMILTER_LIBMILTER_A:-}" ]; then
  static=1
  echo "== linking $NODEMILTER_LIBMILTER_A"
fi
(cd "$work" && NODEMILTER_STATIC=$static NODEMILTER_SANITIZE=1 npx --prefix "$root" node-gyp rebuild >"$work/build.log" 2>&1) || {
  cat "$work/build.log"
  exit 1
}
addon="$work/build/Release/nodemilter.node"
ldd "$addon" | grep -q libasan || { echo "the addon is not linked with ASan"; exit 1; }
asan_rt="$(gcc -print-file-name=libasan.so)"
ubsan_rt="$(gcc -print-file-name=libubsan.so)"
logdir="$work/reports"
mkdir -p "$logdir"
(cd "$root" && npm run --silent build:ts)
echo "== running the integration tests under ASan/UBSan"
status=0
(
  cd "$root"
  # Only the milter processes load the addon: preload the runtime there.
  NODEMILTER_ADDON="$addon" \
    NODEMILTER_CHILD_PRELOAD="$asan_rt $ubsan_rt" \
    ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=0:log_path=$logdir/asan:verify_asan_link_order=0" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=0:log_path=$logdir/ubsan" \
    npx vitest run test/milter.test.ts test/native-core.test.ts --testTimeout=120000 "$@"
) || status=$?
findings=0
for f in "$logdir"/*; do
  [ -e "$f" ] || continue
  # A report cut short (the process exited while ASan wrote it) has no
  # stack to attribute: it counts.
  if grep -q "nodemilter.node\|native/" "$f" || ! grep -q "#0 " "$f"; then
    echo "== finding attributable to the addon: $f"
    cat "$f"
    findings=$((findings + 1))
  else
    echo "== report not involving the addon (ignored): $f"
    head -5 "$f"
  fi
done
echo "sanitizer findings attributable to the addon: $findings"
if [ "$findings" -ne 0 ]; then exit 1; fi
exit "$status"
