# The public API of livedecon.acquisition_hooks (lazy at run time: see __init__.py), so the
# pycromanager hooks load without pymmcore-plus and the other way round.
from ._display_stream import DisplayStream
from ._pycromanager_hooks import PycromanagerHooks, livedecon_hooks, sim_events
from ._pymmcore_hooks import LivedeconHandler, SequenceOptions, attach_livedecon
from ._simulated_microscope import SimulatedMicroscope
from ._viewer import LivedeconWidget, open_viewer

__all__ = [
    "DisplayStream",
    "LivedeconHandler",
    "LivedeconWidget",
    "PycromanagerHooks",
    "SequenceOptions",
    "SimulatedMicroscope",
    "attach_livedecon",
    "livedecon_hooks",
    "open_viewer",
    "sim_events",
]
