"""Which local addresses a peer connection offers as ICE host candidates, chosen per connection.

aiortc exposes no such option: aioice gathers host candidates on every interface it finds, through the
module function ``aioice.ice.get_host_addresses``. That function is replaced once, by one that returns
what the current task asked for with :func:`host_candidates` (a context variable, so two connections
set up at the same time with different addresses do not see each other's) and otherwise does exactly
what aioice's own does. Nothing is pinned for the whole process: a connection set up outside
``host_candidates`` (or with no addresses) offers every interface, as aioice would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar

_PINNED: ContextVar[tuple[str, ...] | None] = ContextVar("ice_host_addresses", default=None)
_aioice_host_addresses: Callable[..., list[str]] | None = None


def _host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    pinned = _PINNED.get()
    if pinned is not None:
        return list(pinned)
    assert _aioice_host_addresses is not None
    return _aioice_host_addresses(use_ipv4=use_ipv4, use_ipv6=use_ipv6)


def _install() -> None:
    global _aioice_host_addresses
    if _aioice_host_addresses is not None:
        return
    import aioice.ice

    _aioice_host_addresses = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = _host_addresses


@contextlib.contextmanager
def host_candidates(addresses: Sequence[str]) -> Iterator[None]:
    """Gather ICE host candidates only on ``addresses`` for the peer connections whose local
    description is set inside this block (``setLocalDescription`` is where aioice gathers); an empty
    sequence leaves aioice's choice (every interface)."""
    if not addresses:
        yield
        return
    _install()
    token = _PINNED.set(tuple(addresses))
    try:
        yield
    finally:
        _PINNED.reset(token)
