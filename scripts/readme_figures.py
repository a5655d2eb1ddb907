"""Render the benchmark figures in ``docs/figures/*.json`` into README.md's measured section.

Usage: ``python scripts/readme_figures.py [--check] [--readme README.md] [--figures docs/figures]``.

Each figures file has a block in README.md between ``<!-- figures:NAME -->`` and
``<!-- /figures:NAME -->`` (NAME is the file's stem: ``encode``, ``templates_storage``, ``calls``).
The script replaces the text between each pair of markers with a table rendered from the file, plus a
line naming the script that wrote it, the machine and the load recorded in it; everything outside the
markers is left alone. A figures file that does not exist leaves its block as it is (with a note on
stderr). With ``--check`` nothing is written: the script prints a diff and exits 1 when README.md
differs from what the files give, so a benchmark rerun without regenerating the README fails the tests.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FIGURES = ROOT / "docs" / "figures"
WIDTH = 105  # README prose is wrapped at about this width


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _num(value: Any, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _para(text: str) -> str:
    """A paragraph wrapped like the rest of the README."""
    return textwrap.fill(text, width=WIDTH, break_long_words=False, break_on_hyphens=False)


def _load(values: Sequence[float] | None) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "not recorded"


def render_encode(fig: dict[str, Any]) -> list[str]:
    m = fig.get("machine", {})
    codecs = ",".join(dict.fromkeys(row["codec"] for row in fig["rows"]))
    bitrates = ",".join(dict.fromkeys(row["bitrate"] for row in fig["rows"]))
    libavcodec = m.get("ffmpeg", {}).get("libavcodec", "?")
    lines = [
        _para(
            f"`scripts/bench_encode.py --seconds {fig['seconds_per_run']:g} --repeats {fig['repeats']} "
            f"--codecs {codecs} --bitrates {bitrates}` ({fig['fps']} fps, median of {fig['repeats']} runs); "
            f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, Python {m.get('python', '?')}, "
            f"aiortc {m.get('aiortc', '?')}, PyAV {m.get('av', '?')}, libavcodec {libavcodec}; "
            f"load average (1/5/15 min) {_load(m.get('load_average_before'))} before, "
            f"{_load(m.get('load_average_after'))} after."
        ),
        "",
    ]
    rows = [
        [
            row["codec"],
            row["bitrate"],
            f"{row['width']}x{row['height']}",
            _num(row["ms_per_frame"], 2),
            _num(row["core_percent"], 1) + " %",
            str(row["kbps"]),
        ]
        for row in fig["rows"]
    ]
    lines += _table(["codec", "bitrate", "size", "CPU ms/frame", "% of a core", "kbps"], rows)
    extras = []
    if fig.get("downscale_ms"):
        costs = "; ".join(
            f"{name.replace('->', '→')} {c[c['track_uses']]:.2f} ms ({c['track_uses']})"
            for name, c in fig["downscale_ms"].items()
        )
        extras.append(f"Downscaling before the encoder (cv2.resize as the track does it): {costs}.")
    nvenc = fig.get("h264_nvenc")
    if nvenc is not None:
        extras.append(
            "h264_nvenc: " + ("available." if nvenc.get("available") else "not available on this machine.")
        )
    if extras:
        lines += ["", _para(" ".join(extras))]
    return lines


def render_templates_storage(fig: dict[str, Any]) -> list[str]:
    m = fig.get("machine", {})
    conditions = fig.get("conditions") or "no conditions noted"
    lines = [
        _para(
            f"`{fig.get('script', 'scripts/bench_templates.py --storage')}` "
            f"({fig['seconds_per_template']:g} s templates, {fig['runs']} runs, recorded {fig.get('recorded', '?')}); "
            f"{m.get('cpus', '?')} CPUs ({m.get('processor', '?')}), load average (1/5/15 min) "
            f"{_load(m.get('load_average_at_start'))} at start, {_load(m.get('load_average_at_end'))} at end; "
            f"{conditions}. Per template second at 25 fps; the cache uses quality {fig.get('chosen_quality', '?')}."
        ),
        "",
    ]
    rows = []
    for row in fig["rows"]:
        psnr = (
            "–"
            if row.get("psnr_db_mean") is None
            else f"{row['psnr_db_mean']:.2f} (min {row['psnr_db_min']:.2f})"
        )
        rows.append(
            [
                f"{row['width']}x{row['height']}",
                row["picture"],
                str(row["quality"]),
                _num(row["ram_mb_per_s"], 2),
                _num(row["disk_mb_per_s"], 2),
                _num(row["raw_over_disk"], 1) + "x",
                _num(row["save_cpu_ms_per_s"], 0),
                _num(row["load_cpu_ms_per_s"], 0),
                psnr,
            ]
        )
    lines += _table(
        [
            "size",
            "picture",
            "quality",
            "RAM MB/s",
            "disk MB/s",
            "raw/disk",
            "save CPU ms/s",
            "load CPU ms/s",
            "PSNR dB",
        ],
        rows,
    )
    warm = fig.get("warm_switch")
    if warm:
        lines += [
            "",
            _para(
                f"Switching to a template already in RAM ({warm['template']}): "
                f"{warm['warm_get_and_acquire_us_median']:.1f} µs median, {warm['loads_warm']} loads from disk; "
                f"the first, cold acquire {warm['cold_acquire_ms']:.0f} ms."
            ),
        ]
    return lines


def _pixels(resolution: str) -> int:
    width, _, height = resolution.partition("x")
    return int(width) * int(height) if width.isdigit() and height.isdigit() else 0


def render_calls(fig: dict[str, Any]) -> list[str]:
    m = fig.get("machine", {})
    runs = sorted(fig["runs"].items(), key=lambda item: (_pixels(item[0]), item[0]))
    calls = sorted({row["calls"] for _, run in runs for row in run["rows"]})
    conditions = "; ".join(
        f"{res}: template `{run['template']}`, {run['seconds_per_run']:g} s per run, receiver bias "
        f"{run['receiver_bias_ms']:+.1f} ms, load average at end {_load(run.get('load_average_at_end'))}"
        for res, run in runs
    )
    # bench_call.py names a presenter template presenter_<its --resolutions choice, - as _>.
    names = [run["template"].removeprefix("presenter_").replace("_", "-") for _, run in runs]
    option = f" --resolutions {' '.join(names)}" if names != ["default"] else ""
    lines = [
        _para(
            f"`scripts/bench_call.py --calls {' '.join(map(str, calls))}{option} --json docs/figures/calls.json` "
            f"({m.get('cpus', '?')} CPUs, Python {m.get('python', '?')}); {conditions}."
        ),
        "",
    ]
    rows = []
    for res, run in runs:
        for row in run["rows"]:
            rows.append(
                [
                    res,
                    str(row["calls"]),
                    _num(row["fps"], 2),
                    f"{_num(row['gap_p50_ms'])} / {_num(row['gap_p99_ms'])}",
                    _num(row["late_percent"], 2) + " %",
                    str(row["dropped"]),
                    _num(row["send_lateness_p99_ms"]),
                    _num(row["lip_offset_ms"], sign=True),
                    _num(row["say_to_audio_ms"], 0),
                    _num(row["cpu_percent_per_call"], 0) + " %",
                    str(row["rss_mb"]),
                    " ".join(row.get("output_sizes_at_end") or []) or "–",
                ]
            )
    lines += _table(
        [
            "resolution",
            "calls",
            "fps at peer",
            "gap p50/p99 ms",
            "late",
            "dropped",
            "send err p99 ms",
            "lip offset ms",
            "say→audio ms",
            "CPU per call",
            "RSS MB",
            "size sent",
        ],
        rows,
    )
    return lines


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "encode": render_encode,
    "templates_storage": render_templates_storage,
    "calls": render_calls,
}


def _markers(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- figures:{re.escape(name)} -->\n)(.*?)(<!-- /figures:{re.escape(name)} -->)", re.DOTALL
    )


def render_readme(readme: str, figures_dir: Path, notes: list[str] | None = None) -> str:
    """README text with each marker block replaced by its figures file's rendering."""
    notes = notes if notes is not None else []
    for path in sorted(figures_dir.glob("*.json")):
        if path.stem not in RENDERERS:
            notes.append(f"{path}: no renderer in scripts/readme_figures.py; not in the README")
    for name, render in RENDERERS.items():
        pattern = _markers(name)
        found = len(pattern.findall(readme))
        if found != 1:
            raise SystemExit(
                f"README needs exactly one <!-- figures:{name} --> … <!-- /figures:{name} --> block"
            )
        path = figures_dir / f"{name}.json"
        if not path.exists():
            notes.append(f"{path} does not exist; the figures:{name} block is left as it is")
            continue
        body = "\n".join(render(json.loads(path.read_text()))) + "\n"
        readme = pattern.sub(lambda match, body=body: match.group(1) + body + match.group(3), readme)
    return readme


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 with a diff if stale")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--figures", type=Path, default=FIGURES, help="folder of the *.json figures files")
    args = parser.parse_args(argv)
    current = args.readme.read_text()
    notes: list[str] = []
    wanted = render_readme(current, args.figures, notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if wanted == current:
        print(f"{args.readme} is in sync with {args.figures}")
        return 0
    if args.check:
        sys.stdout.writelines(
            difflib.unified_diff(
                current.splitlines(keepends=True),
                wanted.splitlines(keepends=True),
                f"{args.readme} (as it is)",
                f"{args.readme} (from {args.figures})",
            )
        )
        print(f"{args.readme} is out of date: run python scripts/readme_figures.py", file=sys.stderr)
        return 1
    args.readme.write_text(wanted)
    print(f"updated {args.readme} from {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
