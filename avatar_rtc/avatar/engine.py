"""What the template library and preparation need from the renderer engine (the seam is defined here,
below ``render/``, so the avatar room never imports the renderers; ``render.base.RendererEngine``
extends it with what sessions need)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from avatar_rtc.avatar.template import Template

# (done, total) frames of a renderer's per-template computation; called from the thread computing it.
ExtrasProgress = Callable[[int, int], None]


class TemplateEngine(Protocol):
    """A renderer engine's part in the template tiers (disk → RAM → its own device tier)."""

    name: str
    # The extras keys this engine adds to a template (empty: it needs none). They can always be
    # recomputed, so the cache drops a damaged one instead of refusing the whole template.
    extras_keys: tuple[str, ...]

    def template_extras(
        self, template: Template, progress: ExtrasProgress | None = None
    ) -> dict[str, np.ndarray]:
        """This engine's per-frame data for ``template``, to store in the cache. Blocking and heavy."""

    def has_extras(self, template: Template) -> bool:
        """Whether ``template.extras`` holds this engine's data, current for its models (cheap)."""

    def warm(self, template: Template) -> None:
        """Bring the template's data into the engine's own tier (device memory). Blocking; a template
        without current extras is left alone (its data must be computed first)."""

    def evict(self, template_id: str) -> None:
        """Drop that again (the RAM tier let the template go); a template in use stays."""
