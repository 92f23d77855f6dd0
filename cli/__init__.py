"""The `livedecon` command line: the top layer, composing engines, calibration, the daemon and
the acquisition hooks. Nothing else in livedecon imports it (tests/test_layers.py).

`app` is the one public name (the `livedecon` entry point). The modules behind it are private:
`_main` holds the app and the commands that only parse options and call the layers below;
`_calibrate`, `_selfnet_commands`, `_sim_commands`, `_bench` and `_demo` the commands with more
to compose; `_output` the one console every command prints through.
"""

import importlib.util

if importlib.util.find_spec("typer") is None:  # a core install: protocol, client, hooks only
    raise SystemExit(
        "the livedecon command needs the daemon extra: pip install 'livedecon[daemon]'"
        " (or 'livedecon[all]' with both acquisition paths)"
    )

# after the install check above, so a core install gets its message, not an ImportError
from livedecon.cli._main import app

__all__ = ["app"]
