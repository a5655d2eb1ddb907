"""What a picker shows about a template: its state in the library, its size and source from the cache's
manifest, and its per-template settings (name, welcome line, language)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

TemplateState = Literal["ready", "warm", "in_use", "preparing", "outdated", "corrupt"]


@dataclass(frozen=True)
class TemplateInfo:
    """What a picker shows about a template, and its per-template settings."""

    id: str
    name: str
    state: TemplateState
    fps: int = 0
    frame_count: int = 0
    width: int = 0
    height: int = 0
    source: str = ""
    welcome: str | None = None
    language: str | None = None
    bytes: int = 0
    error: str | None = None

    @classmethod
    def from_manifest(
        cls, template_id: str, manifest: Mapping[str, Any], state: TemplateState, error: str | None = None
    ) -> TemplateInfo:
        """The info of a template whose cache holds ``manifest`` (checked, current format)."""
        info = manifest.get("info") or {}
        return cls(
            id=template_id,
            name=str(info.get("name") or template_id),
            state=state,
            fps=int(manifest.get("fps", 0)),
            frame_count=int(manifest.get("frame_count", 0)),
            width=int(manifest.get("width", 0)),
            height=int(manifest.get("height", 0)),
            source=str(manifest.get("source", "")),
            welcome=info.get("welcome"),
            language=info.get("language"),
            bytes=sum(int(meta.get("bytes", 0)) for meta in manifest["files"].values()),
            error=error,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "fps": self.fps,
            "frame_count": self.frame_count,
            "seconds": round(self.frame_count / self.fps, 2) if self.fps else 0.0,
            "width": self.width,
            "height": self.height,
            "source": self.source,
            "welcome": self.welcome,
            "language": self.language,
            "bytes": self.bytes,
            "error": self.error,
            "thumbnail": f"/api/templates/{self.id}/thumbnail.jpg",
        }
