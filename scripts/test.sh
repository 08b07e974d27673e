#!/usr/bin/env bash
# Set up what the tests need on a fresh machine, then run them all: the README's test command.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# System tools the tests run for real, installed from Debian's packages when missing:
# redis-server (multi-node tests), Go (the Go reference examples), Chromium (the status
# page) and promtool (the alert rules).
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v go >/dev/null || missing+=(golang-go)
command -v chromium >/dev/null || missing+=(chromium)
command -v promtool >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing: ${missing[*]} (install them: sudo apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
fi

python -m pip install -q -e '.[test]'
exec python -m pytest "$@"
