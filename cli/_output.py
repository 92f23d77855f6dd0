"""What every `livedecon` command prints through: one console, one way to fail."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

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


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    left: Collection[str] = (),
    width: int = 120,
    no_wrap: bool = True,
) -> None:
    """Print a table of already formatted cells; the `left` columns are left-justified, the
    others right. Piped output (a log, CI) gets the whole table at `width` columns rather than
    an 80-column cut."""
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right", no_wrap=no_wrap)
    for cells in rows:
        table.add_row(*cells)
    (console if console.is_terminal else Console(width=width)).print(table)
