"""All live sessions of the process: creation under limits, lookup, and shutdown."""

from __future__ import annotations

import asyncio

from aiortc import RTCSessionDescription

from avatar_rtc import metrics
from avatar_rtc.avatar.library import TemplateLibrary
from avatar_rtc.media import executors
from avatar_rtc.rtc.session import Session, SessionDeps


class TooManySessionsError(RuntimeError):
    pass


class SessionManager:
    def __init__(self, deps: SessionDeps, library: TemplateLibrary) -> None:
        self.deps = deps
        self.library = library
        self.sessions: dict[str, Session] = {}
        # Slots taken by offers still being set up: counted from the first line of create(), so
        # offers that arrive together cannot all pass the limit before any of them is inserted.
        self._reserved = 0

    @property
    def count(self) -> int:
        """Live sessions plus those being set up: what the session limit applies to."""
        return len(self.sessions) + self._reserved

    async def create(
        self, offer: RTCSessionDescription, record: bool = False
    ) -> tuple[Session, RTCSessionDescription]:
        limit = self.deps.settings.limits.max_sessions
        if self.count >= limit:
            raise TooManySessionsError(f"the server is at its limit of {limit} sessions")
        self._reserved += 1
        try:
            template = await self.library.acquire_async(self.library.default_id)
            try:
                # The renderer's device data (MuseTalk's latents) is loaded off the event loop, so the
                # session's own open() is cheap.
                await executors.run_media(self.deps.renderer.warm, template)
                session = Session(self.deps, template, self.library, on_closed=self._forget, record=record)
            except BaseException:
                self.library.release(template.id)
                raise
            # Before accept(): the session's tasks and its peer connection's inherit the id for logs.
            metrics.bind_session(session.id)
            self.sessions[session.id] = session
        finally:
            self._reserved -= 1
        try:
            answer = await session.accept(offer)
        except BaseException:
            await session.close()
            raise
        return session, answer

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def _forget(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            metrics.session_closed(session.playout.stats)

    async def close_all(self) -> None:
        await asyncio.gather(*(s.close() for s in list(self.sessions.values())), return_exceptions=True)
