"""The GPU tier: per-template device data under a byte budget, least recently used first out, never
what a session shows.

An engine keeps one entry per template (MuseTalk: the template's latents on the device). Sessions pin
the entry of the template they show (:meth:`DeviceTier.pin` when a renderer opens, :meth:`unpin` when
it closes); :meth:`admit` evicts unpinned entries, least recently used first, until the new one fits.
Entries pinned by live calls are never evicted, so a tier can run over its budget when the calls' own
templates alone exceed it: refusing them would end calls, and the overrun is reported (``bytes`` above
``budget_bytes`` on /metrics) rather than hidden.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from avatar_rtc.render.base import TierStats

log = logging.getLogger(__name__)


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


Entry = TypeVar("Entry", bound=Sized)


class DeviceTier(Generic[Entry]):
    """Thread-safe LRU of per-template entries under ``budget_bytes``, with pins."""

    def __init__(self, budget_bytes: int, name: str = "device") -> None:
        if budget_bytes <= 0:
            raise ValueError("the device memory budget must be positive")
        self.budget_bytes = int(budget_bytes)
        self.name = name
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._pins: dict[str, int] = {}
        self._lock = threading.Lock()
        self.loads = self.hits = self.evictions = 0

    def get(self, template_id: str, valid: Callable[[Entry], bool] = lambda entry: True) -> Entry | None:
        """The entry if present and ``valid`` (made from the same template data), marked recently used."""
        with self._lock:
            entry = self._entries.get(template_id)
            if entry is None or not valid(entry):
                return None
            self._entries.move_to_end(template_id)
            self.hits += 1
            return entry

    def admit(self, template_id: str, entry: Entry) -> Entry:
        """Add (or replace) ``template_id``'s entry, evicting unpinned ones until it fits."""
        with self._lock:
            self._entries.pop(template_id, None)
            size = entry.nbytes
            while self._used() + size > self.budget_bytes:
                victim = next((i for i in self._entries if not self._pins.get(i)), None)
                if victim is None:
                    log.warning(
                        "%s tier over its budget: %.1f MiB pinned by live calls + %.1f MiB for %r > %.1f MiB",
                        self.name,
                        self._used() / 2**20,
                        size / 2**20,
                        template_id,
                        self.budget_bytes / 2**20,
                    )
                    break
                del self._entries[victim]
                self.evictions += 1
            self._entries[template_id] = entry
            self.loads += 1
            return entry

    def pin(self, template_id: str) -> None:
        with self._lock:
            self._pins[template_id] = self._pins.get(template_id, 0) + 1

    def unpin(self, template_id: str) -> None:
        with self._lock:
            count = self._pins.get(template_id, 0)
            if count <= 1:
                self._pins.pop(template_id, None)
            else:
                self._pins[template_id] = count - 1

    def evict(self, template_id: str) -> bool:
        """Drop the entry unless a session shows it; whether it was dropped."""
        with self._lock:
            if self._pins.get(template_id) or template_id not in self._entries:
                return False
            del self._entries[template_id]
            self.evictions += 1
            return True

    def ids(self) -> list[str]:
        """Template ids held, least recently used first."""
        with self._lock:
            return list(self._entries)

    def _used(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def stats(self, extras_computed: int = 0) -> TierStats:
        with self._lock:
            return TierStats(
                bytes=self._used(),
                budget_bytes=self.budget_bytes,
                templates=len(self._entries),
                pinned=sum(1 for count in self._pins.values() if count > 0),
                loads=self.loads,
                hits=self.hits,
                evictions=self.evictions,
                extras_computed=extras_computed,
            )
