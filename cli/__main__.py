"""`python -m livedecon.cli ...` runs the `livedecon` command line (the daemon's launcher uses
it to start `livedecon serve` as a child process)."""

from livedecon.cli import app

app()
