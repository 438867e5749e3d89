"""What every subcommand shares: --json output, the console, progress bars."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn

# Results (what a command was asked for) go to stdout, through `results` or print_json; progress bars, logs
# and errors to stderr, through `console`. Neither wraps long lines when it is not a terminal.
console = Console(stderr=True, soft_wrap=True)
results = Console(soft_wrap=True, highlight=False)


def add_json_flag(p) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def make_progress(enabled: bool = True) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                    TimeElapsedColumn(), console=console, disable=not enabled or not console.is_terminal, transient=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
