# The public API of livedecon.engines, read by type checkers and, at run time, by the lazy
# loader in __init__.py: nothing is imported until it is used, so `import livedecon.engines`
# stays cheap (torch loads with the first name that needs it).
from .backends import AccuracyGateError, available_backends, open_runtime
from .bioimageio_package import bundle_from_package, export_bioimageio, is_bioimageio_package
from .bundle import BundleError, ModelBundle, find_bundle
from .configfile import ConfigError, load_config
from .enums import Backend, NetworkKind, Precision
from .export import export_onnx
from .networks import Network2DSpec, Network3DSpec, build_network, fast_2d_spec
from .offline import restore_file
from .raw_input import read_raw_image
from .runtime import Runtime
from .selfnet import SelfNetSpec, fast_selfnet_spec, restore_volume
from .selfnet_training import SelfNetTrainingConfig, train_selfnet
from .training import TrainingConfig, TrainingResult, default_recipe, restore, train

__all__ = [
    "AccuracyGateError",
    "Backend",
    "BundleError",
    "ConfigError",
    "ModelBundle",
    "Network2DSpec",
    "Network3DSpec",
    "NetworkKind",
    "Precision",
    "Runtime",
    "SelfNetSpec",
    "SelfNetTrainingConfig",
    "TrainingConfig",
    "TrainingResult",
    "available_backends",
    "build_network",
    "bundle_from_package",
    "default_recipe",
    "export_bioimageio",
    "export_onnx",
    "fast_2d_spec",
    "fast_selfnet_spec",
    "find_bundle",
    "is_bioimageio_package",
    "load_config",
    "open_runtime",
    "read_raw_image",
    "restore",
    "restore_file",
    "restore_volume",
    "train",
    "train_selfnet",
]
