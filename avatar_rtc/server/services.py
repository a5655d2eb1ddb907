"""What the app serves from: the settings, the sessions and the template library (wiring fills it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from avatar_rtc.config import Settings

if TYPE_CHECKING:
    # Types only: `avatar-rtc prepare` imports wiring, and so this module, without the media stack.
    from avatar_rtc.avatar.library import TemplateLibrary
    from avatar_rtc.rtc.manager import SessionManager


@dataclass
class Services:
    settings: Settings
    sessions: SessionManager
    library: TemplateLibrary
