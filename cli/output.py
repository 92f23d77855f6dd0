"""What every `livedecon` command prints through: one console, one way to fail."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()


def fail(message: str) -> typer.Exit:
    """Print `message` as an error; raise the result to exit with code 2."""
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=2)
