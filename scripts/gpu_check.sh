#!/usr/bin/env bash
# The first GPU run in one command. On one H100/H200 it finishes within 8 minutes and prints one
# markdown report:
#   1. the CUDA tests (tests/test_musetalk_cuda.py: fp16 and fp32 faces on the GPU against fp32 on the
#      CPU, CUDA graphs against eager),
#   2. scripts/bench_musetalk.py at batch 1, 4, 8, 16, 32, eager and with CUDA graphs,
#   3. scripts/bench_sessions.py: N = 4, 8, 16, 24 concurrent synthetic sessions at 25 fps through the
#      server's batching worker (aggregate and per-session fps, p99 frame latency, peak device memory).
# Weights are random at the published sizes (no download): speed does not depend on their values.
#
# Needs python3 with a CUDA build of torch. Whatever else is missing (diffusers, transformers,
# safetensors, OpenCV, pytest) is installed from PyPI wheels, never built. Each step has its own time
# limit inside GPU_CHECK_BUDGET_S (default 460 s); a step that runs out is reported, and the rest go on.
# Logs and the JSON rows stay in GPU_CHECK_DIR (default: a new temporary folder).
#
# A dry run of the plumbing on a machine without a GPU (minutes per frame on a CPU, so tiny sizes):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_BATCHES=1 GPU_CHECK_SESSIONS=1 GPU_CHECK_SECONDS=1 scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_DIR:-$(mktemp -d)}
mkdir -p "$OUT"
budget_end=$((SECONDS + ${GPU_CHECK_BUDGET_S:-460}))
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BATCHES=${GPU_CHECK_BATCHES:-1,4,8,16,32}
SESSIONS=${GPU_CHECK_SESSIONS:-4,8,12,16,24}
SESSION_SECONDS=${GPU_CHECK_SECONDS:-5}

missing=()
for pair in diffusers:diffusers transformers:transformers safetensors:safetensors cv2:opencv-python-headless \
  pytest:pytest; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
  echo "installing from PyPI wheels: ${missing[*]}"
  "$PY" -m pip install -q --only-binary=:all: "${missing[@]}" || { echo "gpu_check: install failed" >&2; exit 2; }
fi
if [[ $DEVICE == cuda* ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__)'))" >&2
  exit 2
fi

# step NAME LIMIT_S COMMAND...: runs COMMAND with at most LIMIT_S seconds (less if the budget is nearly
# spent), its output shown and kept in $OUT/NAME.log; its exit status in $OUT/NAME.status.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget_end - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    echo "skipped: out of time" >"$OUT/$name.log"
    echo 124 >"$OUT/$name.status"
    return
  fi
  echo "== $name (at most ${limit} s)"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "${PIPESTATUS[0]}" >"$OUT/$name.status"
}

step cuda-tests 90 "$PY" -m pytest --noconftest -q -p no:cacheprovider tests/test_musetalk_cuda.py
step bench-eager 110 "$PY" scripts/bench_musetalk.py --device "$DEVICE" --batches "$BATCHES" --iterations 5 \
  --budget-s 20 --json "$OUT/batches.jsonl"
if [[ $DEVICE == cuda* ]]; then
  step bench-cuda-graphs 110 "$PY" scripts/bench_musetalk.py --device "$DEVICE" --compile cuda-graphs \
    --batches "$BATCHES" --iterations 5 --budget-s 20 --json "$OUT/batches.jsonl"
fi
step sessions-eager 140 "$PY" scripts/bench_sessions.py --device "$DEVICE" --sessions "$SESSIONS" \
  --seconds "$SESSION_SECONDS" --json "$OUT/sessions.jsonl"

"$PY" - "$OUT" <<'REPORT'
"""The markdown report from the steps' logs and JSON rows."""
import json
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])


def rows(name: str) -> list[dict]:
    path = out / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def status(name: str) -> str:
    path = out / f"{name}.status"
    if not path.exists():
        return "not run"
    code = path.read_text().strip()
    return {"0": "ok", "124": "timed out", "137": "timed out"}.get(code, f"failed (exit {code})")


print("\n## GPU check\n")
print("| step | result |\n|---|---|")
for name in ("cuda-tests", "bench-eager", "bench-cuda-graphs", "sessions-eager"):
    detail = status(name)
    log = out / f"{name}.log"
    if name == "cuda-tests" and log.exists():
        summary = [line for line in log.read_text().splitlines() if re.search(r"\d+ (passed|failed|skipped)", line)]
        detail += f": {summary[-1].strip('= ')}" if summary else ""
    print(f"| {name} | {detail} |")
batches = rows("batches.jsonl")
if batches:
    device = batches[0]["device"]
    print(f"\n### Per batch size ({device}, {batches[0]['dtype']}; ms per frame)\n")
    print("| batch | mode | frames/s | ms/frame | UNet | VAE decode | composite (1080p, 1 CPU thread) |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(batches, key=lambda r: (r["batch"], r["compile"])):
        mode = "eager" if r["compile"] == "off" else r["compile"]
        print(
            f"| {r['batch']} | {mode} | {r['fps']:.1f} | {r['ms_per_frame']:.2f} | "
            f"{r['unet_ms']:.2f} | {r['vae_ms']:.2f} | {r['composite_ms']:.2f} |"
        )
    print(f"\nfeatures: {batches[0]['features_ms_per_answer']:.1f} ms per answer update (one 30 s whisper segment)")
sessions = rows("sessions.jsonl")
if sessions:
    print(f"\n### Concurrent sessions at 25 fps ({sessions[0]['device']}, {sessions[0]['dtype']}, one batching worker)\n")
    print("| sessions | aggregate fps | fps per session (slowest) | p50 ms | p99 ms | late % | mean batch | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sessions:
        print(
            f"| {r['sessions']} | {r['aggregate_fps']:.1f} | {r['per_session_fps']:.1f} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['late_pct']:.1f} | {r['mean_batch']:.1f} | {r['peak_memory_mib']:.0f} |"
        )
print(f"\nlogs: {out}")
REPORT
