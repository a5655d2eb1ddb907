"""What a session refuses: the errors its requests (HTTP routes and data-channel messages) raise."""

from __future__ import annotations


class SessionError(ValueError):
    """A request the session refuses; the message is safe to show the caller."""


class TextTooLongError(SessionError):
    pass
