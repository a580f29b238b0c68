"""The ``saga`` command line (``python -m saga``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saga", description="Durable sagas on PostgreSQL.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run two order sagas (one completes, one is compensated) and print timelines",
        description="Runs on SAGA_DSN when set, else on an embedded PostgreSQL.",
    )
    demo.add_argument("--pgdata", type=Path, help="embedded PostgreSQL data folder")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from saga._demo import main as demo_main

        return demo_main(args.pgdata)
    parser.error(f"unknown command {args.command}")  # pragma: no cover - argparse exits first
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
