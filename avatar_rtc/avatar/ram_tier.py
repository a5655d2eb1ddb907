"""The RAM tier of the template library: templates least recently used first, under a byte budget, with
pins.

A pinned template (shown by a live call) is never evicted, and the tier never holds more than its budget:
a template that cannot fit next to the pinned ones is refused (``admit`` returns False) rather than
squeezed in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from avatar_rtc.avatar.template import Template


def template_bytes(template: Template) -> int:
    """What a template costs in RAM: its frames, landmarks and extras."""
    return int(
        template.frames.nbytes + template.landmarks.nbytes + sum(v.nbytes for v in template.extras.values())
    )


class RamTier:
    """Templates held in RAM by id, with their pin counts.

    Not thread-safe on its own: the library calls it under the one lock that also guards its other
    state, so a check across both (pinned and not being prepared, say) is one atomic step.
    """

    def __init__(self, budget_bytes: int, on_drop: Callable[[str], None]) -> None:
        if budget_bytes <= 0:
            raise ValueError("the RAM budget must be positive")
        self.budget = int(budget_bytes)
        # Called with each id that leaves RAM, so the tier below (the renderer's GPU copy) follows.
        self._on_drop = on_drop
        self._templates: OrderedDict[str, Template] = OrderedDict()  # least recently used first
        self._sizes: dict[str, int] = {}
        self._pins: dict[str, int] = {}

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def ids(self) -> list[str]:
        """Ids held, least recently used first."""
        return list(self._templates)

    def __contains__(self, template_id: object) -> bool:
        return template_id in self._templates

    def get(self, template_id: str) -> Template | None:
        """The template if held (and now the most recently used), else None."""
        template = self._templates.get(template_id)
        if template is not None:
            self._templates.move_to_end(template_id)
        return template

    def holds(self, template_id: str, template: Template) -> bool:
        """Whether ``template`` is the very copy held for ``template_id``."""
        return self._templates.get(template_id) is template

    # -- pins ---------------------------------------------------------------------------------------------
    def pins(self, template_id: str) -> int:
        return self._pins.get(template_id, 0)

    def pin(self, template_id: str) -> None:
        self._pins[template_id] = self._pins.get(template_id, 0) + 1

    def unpin(self, template_id: str) -> None:
        count = self._pins.get(template_id, 0)
        if count <= 0:
            raise ValueError(f"template {template_id!r} is not acquired")
        if count == 1:
            del self._pins[template_id]
        else:
            self._pins[template_id] = count - 1

    # -- admission and eviction -----------------------------------------------------------------------------
    def admit(self, template_id: str, template: Template) -> bool:
        """Hold ``template``, evicting unpinned ones least recently used first; False (and nothing
        evicted) if it cannot fit next to the pinned ones."""
        size = template_bytes(template)
        pinned = sum(s for i, s in self._sizes.items() if self._pins.get(i) and i != template_id)
        if pinned + size > self.budget:
            return False
        self.drop(template_id)
        while sum(self._sizes.values()) + size > self.budget:
            victim = next(i for i in self._templates if not self._pins.get(i))
            self.drop(victim)
        self._templates[template_id] = template
        self._sizes[template_id] = size
        return True

    def replace(self, template_id: str, template: Template) -> None:
        """Swap the copy held for ``template_id`` for ``template`` (the same frames with more extras) in
        place: no eviction, whatever the new size."""
        self._templates[template_id] = template
        self._sizes[template_id] = template_bytes(template)

    def drop(self, template_id: str) -> None:
        if self._templates.pop(template_id, None) is None:
            return
        del self._sizes[template_id]
        self._on_drop(template_id)

    def budget_message(self, template_id: str, template: Template) -> str:
        """Why ``template`` was refused, in MiB."""
        pinned = sum(s for i, s in self._sizes.items() if self._pins.get(i))
        return (
            f"template {template_id!r} needs {template_bytes(template) / 2**20:.0f} MiB of RAM; the budget "
            f"is {self.budget / 2**20:.0f} MiB and live calls pin {pinned / 2**20:.0f} MiB"
        )
