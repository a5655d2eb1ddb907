#!/usr/bin/env bash
# A cluster on this machine, from Debian's packages: redis-server, haproxy (the front door on one
# port), coturn and N avatar_rtc nodes, all on loopback.
#
#   scripts/cluster.sh up --nodes 2 [--front-port 8080] [--base-port 8100] [--max-sessions N] [--full]
#   scripts/cluster.sh status | drain n1 | down
#
# Missing packages are installed with apt-get (as scripts/setup.sh does). Everything else, and the
# haproxy configuration it writes, is scripts/cluster.py (docs/deploy.md: "A cluster").
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "up" ]]; then
  want_apt=()
  command -v redis-server >/dev/null || want_apt+=(redis-server)
  command -v haproxy >/dev/null || want_apt+=(haproxy)
  command -v turnserver >/dev/null || want_apt+=(coturn)
  if ((${#want_apt[@]})); then
    if [[ $(id -u) -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi
    "${SUDO[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${want_apt[@]}"
  fi
fi
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" scripts/cluster.py "$@"
