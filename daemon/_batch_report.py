"""What `livedecon batch` shows: a progress bar while chunks finish, a table at the end."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from livedecon.daemon._batch import BatchSummary, ChunkFailure, ChunkRecord
from livedecon.daemon._batch import Progress as Step


@contextlib.contextmanager
def progress_printer(console: Console) -> Iterator[Step]:
    """A rich progress bar fed by `run_batch`; a failed chunk is printed as it is reported."""
    columns = (
        TextColumn("chunks"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("chunks", total=None)

        def step(done: int, total: int, result: ChunkRecord | ChunkFailure) -> None:
            bar.update(task, completed=done, total=total)
            if isinstance(result, ChunkFailure):
                bar.console.print(
                    f"[red]chunk {list(result.chunk)} of {result.source} failed:[/red]"
                    f" {result.error}"
                )

        yield step


def print_summary(console: Console, summary: BatchSummary) -> None:
    """A batch run's summary as a table: chunks restored, skipped and failed, voxels/s."""
    table = Table(title="livedecon batch")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("chunks (total)", str(summary.chunks_total)),
        ("chunks restored now", str(summary.chunks_done)),
        ("chunks done before (skipped)", str(summary.chunks_skipped)),
        ("chunks failed", str(len(summary.failures))),
        ("tiles inferred", str(summary.tiles_inferred)),
        ("workers", str(summary.workers)),
        ("input voxels restored", f"{summary.voxels:,}"),
        ("wall time", f"{summary.seconds:.1f} s"),
        ("voxels/s", f"{summary.voxels_per_s:,.0f}"),
    ]
    rows += [
        (f"busy {worker}", f"{seconds:.1f} s")
        for worker, seconds in sorted(summary.worker_seconds.items())
    ]
    for row in rows:
        table.add_row(*row)
    (console if console.is_terminal else Console(width=120)).print(table)
    for failure in summary.failures:
        console.print(
            f"[red]failed:[/red] {failure.source} chunk {list(failure.chunk)}"
            f" (input {[list(r) for r in failure.region]}): {failure.error}"
        )
    for output in summary.outputs:
        console.print(f"wrote {output}")
