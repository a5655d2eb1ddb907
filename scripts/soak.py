"""A long load run: hold a fixed number of calls for hours and watch for drift.

Same machinery as load_test.py (server process, talking calls, the server's own frame stats), with
a report every --report-s: late-frame rate, worst p99 send lateness, and the server's CPU and RSS,
so a slow leak or a creeping backlog shows up as a trend rather than a failure at the end.

    python scripts/soak.py --calls 3 --minutes 120
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.load_test import main_async, parser


def soak_parser() -> argparse.ArgumentParser:
    p = parser()
    p.description = __doc__
    p.set_defaults(minutes=60.0, report_s=60.0, calls=2)
    return p


def main() -> int:
    args = soak_parser().parse_args()
    if args.calls is None:
        print("soak.py holds a fixed count: pass --calls (load_test.py finds the capacity)", file=sys.stderr)
        return 2
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
