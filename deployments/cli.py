"""The installed ``multitalk`` command: the library's commands (``multitalk.cli``) plus the
serving layer's.

    multitalk serve [--config FILE]          # Ray Serve, embedded CPU default with no arguments
    multitalk demo [--out OUT.mp4]           # serve locally on tiny weights, submit the sample job, write an mp4
"""
from __future__ import annotations

import argparse
import sys

from multitalk import cli as library_cli


def cmd_serve(args) -> int:
    from .launcher import ConfigError, serve_main

    try:
        serve_main(args.config, host=args.host, port=args.port)
    except ConfigError as e:
        print(f"multitalk serve: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args) -> int:
    from .launcher import demo_main

    return demo_main(out=args.out, fixtures=args.fixtures)


def build_parser() -> argparse.ArgumentParser:
    p = library_cli.build_parser()
    sub = p.commands

    s = sub.add_parser("serve", help="start the Ray Serve application")
    s.add_argument("--config", help="serve config YAML (default: the embedded CPU config)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("demo", help="serve locally on tiny weights, submit the sample job, write an mp4")
    s.add_argument("--out", default="outputs/demo.mp4")
    s.add_argument("--fixtures", default=None, help="folder with multi1/1.wav and multi1/multi1.png")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    return library_cli.main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
