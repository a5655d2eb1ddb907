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
  source scripts/apt_missing.sh
  apt_install_missing redis-server:redis-server haproxy:haproxy turnserver:coturn
fi
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" scripts/cluster.py "$@"
