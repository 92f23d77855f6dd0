# The public API of livedecon.engines, read by type checkers and, at run time, by the lazy
# loader in __init__.py: nothing is imported until it is used, so `import livedecon.engines`
# stays cheap (torch loads with the first name that needs it).
from ._backends import AccuracyGateError, available_backends, open_runtime
from ._bioimageio_package import bundle_from_package, export_bioimageio, is_bioimageio_package
from ._bundle import BundleError, ModelBundle, find_bundle
from ._configfile import ConfigError, load_config
from ._enums import Backend, NetworkKind, Precision
from ._export import export_onnx
from ._networks import Network2DSpec, Network3DSpec, build_network, fast_2d_spec
from ._offline import restore_file
from ._raw_input import read_raw_image
from ._runtime import Runtime
from ._selfnet import SelfNetSpec, fast_selfnet_spec, restore_volume
from ._selfnet_training import SelfNetTrainingConfig, train_selfnet
from ._training import TrainingConfig, TrainingResult, default_recipe, restore, train

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
