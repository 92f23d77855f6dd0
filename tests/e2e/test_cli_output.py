"""CLI errors: one line whatever the terminal's width, printed as written."""

from __future__ import annotations

import io

import pytest
import typer
from rich.console import Console

from livedecon.cli import _output as output


def test_an_error_line_never_wraps_and_keeps_its_brackets(monkeypatch):
    printed = io.StringIO()
    monkeypatch.setattr(output, "console", Console(file=printed, width=40, color_system=None))
    path = "/a/rather/long/directory/name/that/a/user/copies/scope.toml"
    with pytest.raises(typer.Exit) as exited:
        raise output.fail(f"{path}: has no [sample] section")
    assert exited.value.exit_code == 2
    assert printed.getvalue() == f"error: {path}: has no [sample] section\n"
