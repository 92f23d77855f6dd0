"""What every `livedecon` command prints through: one console, one way to fail."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console()


def fail(message: str) -> typer.Exit:
    """Print `message` as an error; raise the result to exit with code 2.

    The line is never wrapped (users copy paths out of it; a narrow terminal folds it, rich does
    not break it) and printed as written, brackets included (no markup in `message`)."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code=2)
