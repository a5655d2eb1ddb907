"""A template library wired to a MuseTalk engine, as the server wires it, for tests on tiny models."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.avatar.store import TemplateStore
from avatar_rtc.avatar.template import Template


def musetalk_library(
    cache_dir: Path,
    engine: Any,
    templates: list[Template],
    *,
    complete: bool = True,
    ram_budget_bytes: int = 1 << 30,
) -> TemplateLibrary:
    """``templates`` saved under ``cache_dir`` (without MuseTalk data: as prepared before MuseTalk was
    enabled), the first as the default; ``complete`` computes and caches the default's data."""
    store = TemplateStore(cache_dir)
    for template in templates:
        store.save(dataclasses.replace(template, extras={}), info={"name": template.id})
    library = TemplateLibrary(
        store, ram_budget_bytes=ram_budget_bytes, engine=engine, default_id=templates[0].id
    )
    if complete:
        library.complete_extras(templates[0].id)
        library.warm(templates[0].id)
    return library
