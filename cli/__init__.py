"""The `livedecon` command line: the top layer, composing engines, calibration, the daemon and
the acquisition hooks. Nothing else in livedecon imports it (tests/test_layers.py).

`main` holds the app and the commands that only parse options and call the layers below;
`calibrate`, `selfnet`, `bench` and `demo` the commands with more to compose; `output` the one
console every command prints through.
"""

import importlib.util

if importlib.util.find_spec("typer") is None:  # a core install: protocol, client, hooks only
    raise SystemExit(
        "the livedecon command needs the daemon extra: pip install 'livedecon[daemon]'"
        " (or 'livedecon[all]' with both acquisition paths)"
    )
