"""Forward model, camera noise, PSF, fixed-pattern noise, metrics and calibration runs."""

import lazy_loader

# The public names are listed once, in __init__.pyi; each is imported on first use.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
