"""README.md's measured tables are generated from docs/figures/*.json by scripts/readme_figures.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.readme_figures import FIGURES, README, main, render_readme


def test_readme_is_in_sync_with_the_figures_files() -> None:
    """A benchmark rerun that rewrites docs/figures/*.json without regenerating README.md fails here."""
    current = README.read_text()
    assert render_readme(current, FIGURES) == current, (
        "README.md's figures blocks differ from docs/figures/*.json: run python scripts/readme_figures.py"
    )


ENCODE = {
    "machine": {
        "cpu": "Test CPU",
        "cores": 2,
        "python": "3.11.7",
        "aiortc": "1.16.0",
        "av": "18.1.0",
        "ffmpeg": {"libavcodec": "62.28.102"},
        "load_average_before": [1.0, 2.0, 3.0],
        "load_average_after": [1.5, 2.5, 3.5],
    },
    "fps": 25,
    "seconds_per_run": 4.0,
    "repeats": 3,
    "rows": [
        {
            "codec": "VP8",
            "bitrate": "default",
            "width": 512,
            "height": 512,
            "ms_per_frame": 5.5,
            "core_percent": 13.7,
            "kbps": 485,
        }
    ],
}

CALLS = {
    "runs": {
        "1280x720": {
            "template": "presenter_720p_landscape",
            "seconds_per_run": 15.0,
            "receiver_bias_ms": -3.2,
            "load_average_at_end": [2.0, 2.1, 2.2],
            "rows": [
                {
                    "calls": 2,
                    "fps": 24.98,
                    "gap_p50_ms": 40.0,
                    "gap_p99_ms": 61.3,
                    "late_percent": 0.12,
                    "dropped": 1,
                    "send_lateness_p99_ms": 12.5,
                    "lip_offset_ms": 0.4,
                    "say_to_audio_ms": 401,
                    "cpu_percent_per_call": 47.3,
                    "rss_mb": 1012,
                    "output_sizes_at_end": ["1280x720"],
                }
            ],
        }
    },
    "machine": {"cpus": 2, "python": "3.11.7"},
}

PROSE_BEFORE = "# Title\n\nSome prose that says 1.23 ms.\n\n"
PROSE_AFTER = "\nMore prose, 4.56 %.\n"


def _readme(encode: str, storage: str, calls: str) -> str:
    return (
        f"{PROSE_BEFORE}<!-- figures:encode -->\n{encode}<!-- /figures:encode -->\n\nMiddle 7.89.\n\n"
        f"<!-- figures:templates_storage -->\n{storage}<!-- /figures:templates_storage -->\n\n"
        f"<!-- figures:calls -->\n{calls}<!-- /figures:calls -->\n{PROSE_AFTER}"
    )


def test_replaces_only_between_markers_and_check_fails_when_stale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "encode.json").write_text(json.dumps(ENCODE))
    (figures / "calls.json").write_text(json.dumps(CALLS))
    # No templates_storage.json: its block is left as it is.
    readme = tmp_path / "README.md"
    stale = _readme("| old | table |\n", "Kept: not measured yet.\n", "stale calls 99.9\n")
    readme.write_text(stale)
    args = ["--readme", str(readme), "--figures", str(figures)]

    assert main([*args, "--check"]) == 1
    diff = capsys.readouterr().out
    assert "-| old | table |" in diff and "+| VP8 | default | 512x512 | 5.50 | 13.7 % | 485 |" in diff
    assert readme.read_text() == stale, "--check writes nothing"

    assert main(args) == 0
    text = readme.read_text()
    assert text.startswith(PROSE_BEFORE) and text.endswith(PROSE_AFTER)
    assert "\n\nMiddle 7.89.\n\n" in text
    assert "| old | table |" not in text and "stale calls 99.9" not in text
    assert (
        "<!-- figures:templates_storage -->\nKept: not measured yet.\n<!-- /figures:templates_storage -->"
        in text
    )
    assert "load average (1/5/15 min) 1.0/2.0/3.0 before, 1.5/2.5/3.5 after" in " ".join(text.split())
    assert (
        "| 1280x720 | 2 | 24.98 | 40.0 / 61.3 | 0.12 % | 1 | 12.5 | +0.4 | 401 | 47 % | 1012 | 1280x720 |"
        in text
    )
    assert "--resolutions 720p-landscape" in " ".join(text.split())
    assert main([*args, "--check"]) == 0

    # A number edited by hand inside a block is stale again; the same edit outside the blocks is not.
    readme.write_text(text.replace("| 5.50 |", "| 5.40 |"))
    assert main([*args, "--check"]) == 1
    readme.write_text(text.replace("Middle 7.89.", "Middle 7.80."))
    assert main([*args, "--check"]) == 0

    # A figures file rerun with a new number makes the README stale.
    encode_rerun = json.loads(json.dumps(ENCODE))
    encode_rerun["rows"][0]["kbps"] = 490
    (figures / "encode.json").write_text(json.dumps(encode_rerun))
    assert main([*args, "--check"]) == 1


def test_a_missing_marker_is_an_error(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("<!-- figures:encode -->\n<!-- /figures:encode -->\n")
    with pytest.raises(SystemExit, match="templates_storage"):
        main(["--readme", str(readme), "--figures", str(tmp_path), "--check"])
