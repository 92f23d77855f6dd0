"""Clients of the daemon on the microscope's side: pycromanager and pymmcore-plus hooks, the
display stream and napari viewer of its publications, and the simulated microscope."""

import lazy_loader

# The public names are listed once, in __init__.pyi; each is imported on first use.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
