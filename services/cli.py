"""The `retrogram` command: one entry point, one module per group of subcommands (cli_*.py)."""

from __future__ import annotations

import argparse
import os
import sys

from ..index.errors import UserError
from . import cli_demo, cli_generate, cli_index, cli_ngram, cli_retrieve, cli_serve

# Each module adds its subcommands with register(subparsers).
COMMAND_MODULES = [cli_index, cli_ngram, cli_retrieve, cli_generate, cli_serve, cli_demo]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="retrogram", description="Retrieval- and n-gram-augmented language models: "
                     "build an index over a corpus, query n-gram statistics, retrieve chunks, serve over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Models come from installed packages or local directories, never a hub; keep their loaders quiet.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"retrogram {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"retrogram {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
