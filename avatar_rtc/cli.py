"""Command line: ``avatar-rtc serve``, ``prepare`` (a video or photo into a template) and ``render``
(speech to an MP4 file)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from avatar_rtc.config import Settings
from avatar_rtc.config_file import ConfigError, add_config_arguments, config_command, load_settings


def _settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    """The effective settings (command line over environment over TOML file); exits on bad ones."""
    try:
        return load_settings(args.config, **{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as error:
        print(f"avatar-rtc: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from avatar_rtc.metrics import configure_logging
    from avatar_rtc.server.app import create_app, server_options
    from avatar_rtc.wiring import build_services

    settings = _settings(args, host=args.host, port=args.port)
    logs = settings.observability
    configure_logging(logs.json_logs, "DEBUG" if args.verbose else logs.log_level)
    services = build_services(settings)
    app = create_app(services)
    if settings.cluster.enabled:
        import signal

        from avatar_rtc.server.cluster import CLUSTER_NODE

        # SIGTERM drains (live calls finish, then exit); the drain ends in aiohttp's own SIGINT exit.
        node = app[CLUSTER_NODE]
        node.handle_sigterm = True
        node.exit_when_drained = lambda: signal.raise_signal(signal.SIGINT)
    url = f"http://{settings.host}:{settings.port}"
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=lambda _: print(f"avatar_rtc serving on {url} (Ctrl+C to stop)", flush=True),
        shutdown_timeout=5.0,
        **server_options(settings),
    )
    return 0


def _progress_bars() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )


def _prepare(args: argparse.Namespace) -> int:
    from avatar_rtc.avatar.face import FaceNotFoundError
    from avatar_rtc.avatar.library import TemplateInUseError, library_from_settings
    from avatar_rtc.avatar.video import SourceMediaError
    from avatar_rtc.wiring import build_renderer

    settings = _settings(args)
    library = library_from_settings(settings, build_renderer(settings))
    info = {
        k: v for k, v in {"name": args.name, "welcome": args.welcome, "language": args.language}.items() if v
    }
    with _progress_bars() as bars:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        try:
            result = library.prepare(
                args.path, args.id, info=info or None, progress=progress, force=args.force
            )
        except (SourceMediaError, FaceNotFoundError, TemplateInUseError, ValueError, OSError) as error:
            bars.stop()
            print(f"avatar-rtc prepare: {error}", file=sys.stderr)
            return 2
    template = result.info
    seconds = template.frame_count / template.fps if template.fps else 0.0
    if result.cache_hit:
        print(f"template {template.id!r} is already prepared from this file ({template.frame_count} frames)")
    else:
        speed = seconds / result.seconds if result.seconds > 0 else 0.0
        print(
            f"template {template.id!r} ready: {template.frame_count} frames ({seconds:.1f} s) prepared in "
            f"{result.seconds:.1f} s ({speed:.1f}x real time) under {library.store.path(template.id)}"
        )
    return 0


def _render(args: argparse.Namespace) -> int:
    import asyncio

    from avatar_rtc.avatar.library import TemplateNotFoundError, library_from_settings
    from avatar_rtc.avatar.store import TemplateCacheError
    from avatar_rtc.avatar.video import SourceMediaError
    from avatar_rtc.conversation.offline import AudioClipSpeech, decode_audio, render_to_file
    from avatar_rtc.wiring import build_renderer, build_tts

    settings = _settings(args)
    engine = build_renderer(settings)
    library = library_from_settings(settings, engine)
    try:
        if args.template == library.default_id:
            template = library.ensure_default()
        else:
            template = library.get(args.template)
        if args.audio is not None:
            speech: Any = AudioClipSpeech(decode_audio(args.audio), 48000)
        else:
            speech = build_tts(settings)
    except (TemplateNotFoundError, TemplateCacheError, SourceMediaError, ValueError) as error:
        print(f"avatar-rtc render: {error}", file=sys.stderr)
        return 2
    with _progress_bars() as bars:
        task = bars.add_task("render", total=None)
        result = asyncio.run(
            render_to_file(
                args.output,
                template,
                engine,
                speech,
                args.text or "",
                fps=settings.media.fps,
                progress=lambda done, total: bars.update(task, completed=done, total=total),
            )
        )
    print(f"wrote {result.path}: {result.duration_s:.2f} s, {result.frames} frames at {result.fps} fps")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-rtc", description="Self-hosted real-time talking avatar")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--config", type=Path, help="TOML settings file (default: $AVATAR_RTC_CONFIG, else ./avatar-rtc.toml)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the WebRTC server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.set_defaults(func=_serve)
    prepare = commands.add_parser("prepare", help="prepare a video or photo of a face as an avatar template")
    prepare.add_argument("path", help="the video (or photo) file")
    prepare.add_argument("--id", required=True, help="template id: letters, digits, '_' and '-'")
    prepare.add_argument("--name", help="name shown in the picker (default: the id)")
    prepare.add_argument("--welcome", help="line the avatar says when a caller switches to it")
    prepare.add_argument("--language", help="language of the welcome line and replies, e.g. en")
    prepare.add_argument("--force", action="store_true", help="prepare again even if the cache is current")
    prepare.set_defaults(func=_prepare)
    render = commands.add_parser("render", help="render speech as a template to an MP4 file")
    render.add_argument("--template", default="default", help="template id (default: default)")
    what = render.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="text to speak (through the configured TTS)")
    what.add_argument("--audio", help="an audio file to lip-sync to")
    render.add_argument("-o", "--output", required=True, help="the MP4 file to write")
    render.set_defaults(func=_render)
    config = commands.add_parser("config", help="print the effective settings (file, then environment)")
    add_config_arguments(config)
    config.set_defaults(func=config_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
