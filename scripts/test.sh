#!/usr/bin/env bash
# Set up everything the tests need, then run the whole suite. Tests reach only 127.0.0.1: where
# possible they run in a network namespace that has nothing but loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
AVATAR_RTC_WITH_TESTS=1 AVATAR_RTC_WITH_BROWSER=1 bash scripts/setup.sh

.venv/bin/ruff check avatar_rtc tests scripts
run=(.venv/bin/python -m pytest "$@")
if [[ $(id -u) -eq 0 ]] && unshare -n true 2>/dev/null; then
  exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh "${run[@]}"
fi
echo "note: no network namespace (needs root); tests still pin every peer connection to 127.0.0.1" >&2
exec "${run[@]}"
