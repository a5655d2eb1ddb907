"""What a session reports about its media (``GET /api/sessions/{id}/stats``)."""

from __future__ import annotations

from typing import Any

from avatar_rtc.media.playout import PlayoutStats
from avatar_rtc.rtc.tracks import AvatarVideoTrack


def session_stats(
    *,
    session_id: str,
    state: str,
    media_time_s: float,
    playout: PlayoutStats,
    video_source: AvatarVideoTrack,
    video_encoder: str,
) -> dict[str, Any]:
    lateness = sorted(playout.video_send_lateness)

    def pct(q: float) -> float | None:
        return round(lateness[min(len(lateness) - 1, int(q * len(lateness)))] * 1000, 2) if lateness else None

    return {
        "session_id": session_id,
        "state": state,
        "media_time_s": round(media_time_s, 3),
        "frames_sent": playout.frames_sent,
        "frames_rendered": playout.frames_rendered,
        "frames_idle": playout.frames_idle,
        "frames_late": playout.frames_late,
        "frames_dropped": playout.frames_dropped,
        "audio_frames_sent": playout.audio_frames_sent,
        "send_lateness_ms_p50": pct(0.5),
        "send_lateness_ms_p99": pct(0.99),
        "output_size": list(video_source.output_size),
        "video_quality": video_source.quality_level,
        "video_encoder": video_encoder,
    }
