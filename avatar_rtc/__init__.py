"""avatar_rtc: a self-hosted, real-time talking avatar served over WebRTC."""

__version__ = "0.1.0"
