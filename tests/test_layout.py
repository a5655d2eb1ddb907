"""The house rule (README, Development: Layout): a room imports only rooms below it.

Rooms, top to bottom: server → rtc → conversation → render → avatar → media. Above them sit the
composition modules: ``cli`` and ``wiring`` may import anything (wiring is the one place settings pick
engines). ``config``, its file loader, ``bounded_json`` and ``metrics`` (the Prometheus metrics and
structured logs every room reports to; the web side, ``GET /metrics`` and the access log, is
``server.observability``) and the package root (for ``__version__``) are usable by every room and
import no room themselves. ``media`` (the clock and the playout timeline) is the bottom room: the
playout knows a template only as the small ``IdleLoop`` protocol it declares, not ``avatar``'s class.
``testing`` may import anything, and nothing in the product may import it.

Every import counts, wherever it is written (module level, inside a function, under TYPE_CHECKING): a
lazy import is still an arrow between rooms.
"""

from __future__ import annotations

import ast
from pathlib import Path

import avatar_rtc

PACKAGE = "avatar_rtc"
PACKAGE_DIR = Path(avatar_rtc.__file__).parent
# Top first: a module may import its own room and the rooms after it in this list.
ORDER = ("cli", "wiring", "server", "rtc", "conversation", "render", "avatar", "media")
# Usable by every room ("" is the package root).
BASE = frozenset({"", "config", "config_file", "bounded_json", "metrics"})
TESTING = "testing"

# Arrows that climb today: (importing module, imported module). The test fails when one of them is
# gone (take it off this list) and on any climbing import that is not here. None today: keep it so.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()


def module_name(path: Path, package_dir: Path) -> str:
    """``avatar_rtc.rtc.session`` for ``<package_dir>/rtc/session.py``; a package is its __init__."""
    parts = path.relative_to(package_dir).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def room_of(module: str) -> str:
    """The room of a module of the package: its first name below ``avatar_rtc`` ("" for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_module(name: str, package_dir: Path) -> bool:
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    return (package_dir / relative).with_suffix(".py").is_file() or (
        package_dir / relative / "__init__.py"
    ).is_file()


def imported_modules(path: Path, package_dir: Path) -> set[str]:
    """The package's modules that the file at ``path`` imports (``from a.b import c`` is ``a.b.c``
    where ``c`` is a module, else ``a.b``)."""
    module = module_name(path, package_dir)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _is_module(candidate, package_dir) else base)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def climbs(from_room: str, to_room: str) -> bool:
    """Whether an import from a module of ``from_room`` into ``to_room`` breaks the rule."""
    if from_room == to_room or to_room in BASE:
        return False
    if to_room == TESTING:
        return True  # the product never imports its test helpers (testing's own modules are one room)
    if from_room == TESTING:
        return False
    if from_room in BASE:
        return True  # config and friends stay importable by all: they import no room
    return ORDER.index(to_room) < ORDER.index(from_room)


def climbing_imports(package_dir: Path) -> set[tuple[str, str]]:
    """Every (importing module, imported module) arrow of the package at ``package_dir`` that climbs."""
    arrows: set[tuple[str, str]] = set()
    for path in sorted(package_dir.rglob("*.py")):
        module = module_name(path, package_dir)
        for imported in imported_modules(path, package_dir):
            if climbs(room_of(module), room_of(imported)):
                arrows.add((module, imported))
    return arrows


def test_every_module_is_in_a_known_room() -> None:
    rooms = {room_of(module_name(path, PACKAGE_DIR)) for path in PACKAGE_DIR.rglob("*.py")}
    unknown = rooms - set(ORDER) - BASE - {TESTING}
    assert not unknown, f"modules outside the house's rooms: {sorted(unknown)}; place them in ORDER or BASE"


def test_no_room_imports_a_room_above_it() -> None:
    new = climbing_imports(PACKAGE_DIR) - KNOWN_VIOLATIONS
    assert not new, (
        "imports that climb to a room above their own ("
        + " > ".join(ORDER)
        + "):\n"
        + "\n".join(f"  {importer} imports {imported}" for importer, imported in sorted(new))
    )


def test_known_violations_still_exist() -> None:
    stale = KNOWN_VIOLATIONS - climbing_imports(PACKAGE_DIR)
    assert not stale, "no longer imported; take them off KNOWN_VIOLATIONS:\n" + "\n".join(
        f"  {importer} imports {imported}" for importer, imported in sorted(stale)
    )


def test_the_check_catches_a_climbing_import(tmp_path: Path) -> None:
    """A package laid out like this one, with one import up (avatar → rtc), one down (rtc → avatar),
    one lazy import of testing from the product, and one relative import up."""
    files = {
        "__init__.py": "",
        "config.py": "",
        "avatar/__init__.py": "",
        "avatar/face.py": "from avatar_rtc.config import Settings\n",
        "avatar/prepare.py": "def f():\n    from avatar_rtc.rtc import playout\n",
        "avatar/store.py": "from ..render import base\n",
        "render/__init__.py": "",
        "render/base.py": "from avatar_rtc.avatar import face\n",
        "rtc/__init__.py": "",
        "rtc/playout.py": "import avatar_rtc.avatar.face\nfrom avatar_rtc.testing import synthetic\n",
        "testing/__init__.py": "",
        "testing/synthetic.py": "from avatar_rtc.rtc import playout\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert climbing_imports(tmp_path) == {
        ("avatar_rtc.avatar.prepare", "avatar_rtc.rtc.playout"),
        ("avatar_rtc.avatar.store", "avatar_rtc.render.base"),
        ("avatar_rtc.rtc.playout", "avatar_rtc.testing.synthetic"),
    }
