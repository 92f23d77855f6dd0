# The public API of livedecon.daemon (lazy at run time: see __init__.py). Clients need only
# DaemonClient and the protocol's messages, which import no torch.
from .batch import BatchOptions, run_batch
from .batch_report import print_summary, progress_printer
from .client import DaemonClient, DaemonError, DaemonUnavailable
from .daemon_config import DaemonConfig, load_daemon_config
from .launcher import DaemonProcess, spawn_daemon
from .protocol import AdaptationPlan, Axes, Plan, SimPlan, Topic, decode_publication
from .reprocess import ReprocessError, reprocess
from .security import client_security
from .server import Daemon

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
