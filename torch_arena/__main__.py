"""Command line: ``python -m torch_arena {demo,bench,doctor,hook}``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: "list[str] | None" = None) -> int:
    """Run one subcommand; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m torch_arena",
        description="Shared-memory arenas for the PyTorch DataLoader.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="quick stock vs ring vs pool comparison on synthetic data", add_help=False)
    sub.add_parser(
        "bench",
        help="the A/B transport benchmark (table, CSV, PNG); 'bench sizing' / 'bench pipeline': the sizing benchmark",
        add_help=False,
    )
    sub.add_parser("doctor", help="platform facts that matter and recommended arena sizes", add_help=False)
    sub.add_parser("hook", help="the start-up hook that reads TORCH_ARENA: status, install, remove", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from torch_arena._tools.demo import main as run
    elif args.command == "bench":
        from torch_arena._tools.bench import main as run
    elif args.command == "hook":
        from torch_arena._tools.hook import main as run
    else:
        from torch_arena._tools.doctor import main as run
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
