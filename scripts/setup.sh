#!/usr/bin/env bash
# One-command set-up for a development checkout on Debian/Ubuntu: system
# packages (libmilter, and Postfix, Redis and pymilter for the tests),
# npm dependencies, the native addon and the TypeScript build; then it starts
# the sample milter on inet:8894@127.0.0.1 (stop it with Ctrl-C).
# NODEMILTER_SETUP_NO_START=1 sets up without starting.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
mapfile -t pkgs < scripts/system-packages.txt
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  # Postfix asks how to configure itself; the tests run private instances.
  echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
echo "== npm ci (builds the native addon)"
npm ci --no-audit --no-fund
echo "== TypeScript build"
npm run build:ts
if [ "${NODEMILTER_SETUP_NO_START:-}" = "1" ]; then exit 0; fi
echo "== starting the sample milter (Ctrl-C stops it)"
exec npm start
