"""What every subcommand shares: --json output, the console, progress bars."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)   # human output and progress on stderr; stdout stays for results


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
