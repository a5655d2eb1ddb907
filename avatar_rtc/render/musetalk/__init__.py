"""MuseTalk v1.5 renderer: the official weights, streaming whisper features, one batched GPU worker.

Importing this package is cheap: torch, diffusers and transformers load only when an engine is built.
"""

from avatar_rtc.render.musetalk.layout import FETCH_COMMAND, MuseTalkUnavailableError, missing_files

__all__ = ["FETCH_COMMAND", "MuseTalkEngine", "MuseTalkUnavailableError", "missing_files"]


def __getattr__(name: str) -> object:
    # The engine module is light too, but keep the package namespace lazy so `import avatar_rtc.render.
    # musetalk` never drags in the renderer stack unless the engine is asked for.
    if name == "MuseTalkEngine":
        from avatar_rtc.render.musetalk.renderer import MuseTalkEngine

        return MuseTalkEngine
    raise AttributeError(name)
