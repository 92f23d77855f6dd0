# The public API of livedecon.daemon (lazy at run time: see __init__.py). Clients need only
# DaemonClient and the protocol's messages, which import no torch.
from ._batch import BatchOptions, run_batch
from ._batch_report import print_summary, progress_printer
from ._client import DaemonClient, DaemonError, DaemonUnavailable
from ._daemon_config import DaemonConfig, load_daemon_config
from ._launcher import DaemonProcess, spawn_daemon
from ._protocol import AdaptationPlan, Axes, Plan, SimPlan, Topic, decode_publication
from ._reprocess import ReprocessError, reprocess
from ._security import client_security
from ._server import Daemon

__all__ = [
    "AdaptationPlan",
    "Axes",
    "BatchOptions",
    "Daemon",
    "DaemonClient",
    "DaemonConfig",
    "DaemonError",
    "DaemonProcess",
    "DaemonUnavailable",
    "Plan",
    "ReprocessError",
    "SimPlan",
    "Topic",
    "client_security",
    "decode_publication",
    "load_daemon_config",
    "print_summary",
    "progress_printer",
    "reprocess",
    "run_batch",
    "spawn_daemon",
]
