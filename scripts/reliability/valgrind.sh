#!/usr/bin/env bash
# Runs the reliability milter (scripts/reliability/milter.cjs, the normal
# addon build) under valgrind --leak-check=full, sends it N messages with
# MilterClient (drive.cjs; every 10th session dropped mid-body), stops it with
# SIGTERM, and reports the "definitely lost" records that involve the addon
# (nodemilter.node) or libmilter. Node/V8's own allocations are suppressed
# (node.supp).
#
#   npm run valgrind                # 10000 messages
#   npm run valgrind -- 2000        # fewer
#
# Exits 1 if a definite leak is attributable to the addon or libmilter.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
n="${1:-10000}"
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)"; exit 2; }
work="$(mktemp -d /tmp/nodemilter-valgrind.XXXXXX)"
sock="$work/milter.sock"
log="$work/valgrind.log"
(cd "$root" && npm run --silent build:ts)
echo "== starting the milter under valgrind (log: $log)"
RELIABILITY_CONFIG="{\"socket\":\"unix:$sock\",\"quiet\":true,\"deadline\":{\"default\":60000}}" \
  valgrind --leak-check=full --show-leak-kinds=definite,possible --errors-for-leak-kinds=definite \
  --num-callers=40 --suppressions="$root/scripts/reliability/node.supp" --log-file="$log" \
  node "$root/scripts/reliability/milter.cjs" >"$work/milter.out" 2>"$work/milter.err" &
pid=$!
for _ in $(seq 1 600); do
  [ -S "$sock" ] && break
  kill -0 "$pid" 2>/dev/null || { echo "the milter died at start"; cat "$work/milter.err"; exit 2; }
  sleep 0.2
done
[ -S "$sock" ] || { echo "the milter did not listen within 120 s"; kill -9 "$pid"; exit 2; }
echo "== sending $n messages"
start=$(date +%s)
drive_rc=0
node "$root/scripts/reliability/drive.cjs" --socket "unix:$sock" --messages "$n" --conns 4 >"$work/drive.out" || drive_rc=$?
echo "drive: $(cat "$work/drive.out") in $(( $(date +%s) - start )) s"
kill -USR2 "$pid"; sleep 5
grep '"ev":"stats"' "$work/milter.out" | tail -1 || true
kill -TERM "$pid"
wait "$pid" || true
echo "== valgrind's summary"
sed -n '/HEAP SUMMARY/,$p' "$log" | sed 's/^==[0-9]*== //'
# Loss records (blocks between "are definitely lost" and the next blank line) naming the addon or libmilter.
attributable=$(awk '
  /are definitely lost in loss record/ { inrec = 1; rec = $0 "\n"; next }
  inrec && /^==[0-9]+== *$/ { if (rec ~ /nodemilter\.node|libmilter/) { n++; printf "%s\n", rec > "/dev/stderr" } inrec = 0; next }
  inrec { rec = rec $0 "\n" }
  END { print n + 0 }' "$log")
echo "definitely lost records attributable to nodemilter.node or libmilter: $attributable"
echo "(full log kept in $log)"
if [ "$attributable" -ne 0 ] || [ "$drive_rc" -ne 0 ]; then exit 1; fi
