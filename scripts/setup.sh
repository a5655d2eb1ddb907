#!/usr/bin/env bash
# Set up avatar_rtc on a fresh Debian machine: system packages, a virtual environment, the project.
# Idempotent: run it again and it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

want_apt=()
command -v espeak-ng >/dev/null || want_apt+=(espeak-ng)
command -v sox >/dev/null || want_apt+=(sox)
command -v ip >/dev/null || want_apt+=(iproute2)
if [[ "${AVATAR_RTC_WITH_BROWSER:-0}" == "1" ]]; then
  # Headless Chromium for the end-to-end browser test (Debian's, never a downloaded build).
  command -v chromium >/dev/null || want_apt+=(chromium)
fi
if ((${#want_apt[@]})); then
  if [[ $(id -u) -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi
  "${SUDO[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${want_apt[@]}"
fi

PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extras=""
[[ "${AVATAR_RTC_WITH_TESTS:-0}" == "1" ]] && extras="[test]"
.venv/bin/python -m pip install -q -e ".${extras}"
