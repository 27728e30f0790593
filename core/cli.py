"""The `sealer` command. Subcommands import their heavy modules only when they run."""

import argparse
import logging
import sys


def _add_seal_commands(subparsers) -> None:
    from core import seal_cli

    seal_cli.add_commands(subparsers)


def _add_lab_commands(subparsers) -> None:
    from core.lab import cli as lab_cli

    lab_cli.add_commands(subparsers)


def _add_service_commands(subparsers) -> None:
    from core import service_cli

    service_cli.add_commands(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sealer", description="Remove textual backdoors from text-to-image models.")
    parser.add_argument(
        "--log-level",
        default=None,
        help="Python logging level (default: INFO, or WARNING when a progress bar is drawn on a terminal).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_seal_commands, _add_lab_commands, _add_service_commands):
        try:
            add(subparsers)
        except ImportError as error:  # A module still being written must not break the others.
            logging.getLogger(__name__).debug("subcommands unavailable: %s", error)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    draws_progress = getattr(args, "draws_progress", False) and sys.stderr.isatty()
    level = args.log_level or ("WARNING" if draws_progress else "INFO")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
