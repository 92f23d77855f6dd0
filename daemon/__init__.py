"""The acquisition-side daemon: protocol, server, pipeline, writer, publisher, journal,
adaptation scheduler, telemetry, client and launcher; batch restoration on dask.

Clients of a running daemon (the acquisition hooks, the display stream, the viewer) live in
livedecon.acquisition_hooks and need only `client` and `protocol` from here.
"""

import lazy_loader

# The public names are listed once, in __init__.pyi; each is imported on first use.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
