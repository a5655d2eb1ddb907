"""Command line: ``avatar-rtc serve`` (and later prepare, render, config)."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from avatar_rtc.config import Settings


def _serve(args: argparse.Namespace) -> int:
    from avatar_rtc.server.app import create_app
    from avatar_rtc.wiring import build_services

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = Settings(**overrides)
    services = build_services(settings)
    app = create_app(services)
    url = f"http://{settings.host}:{settings.port}"
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=lambda _: print(f"avatar_rtc serving on {url} (Ctrl+C to stop)", flush=True),
        shutdown_timeout=5.0,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-rtc", description="Self-hosted real-time talking avatar")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the WebRTC server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.set_defaults(func=_serve)
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
