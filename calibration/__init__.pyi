# The public API of livedecon.calibration (lazy at run time: see __init__.py).
from ._calibration_bundle import CalibrationBundle
from ._config import Camera, MicroscopeConfig, Optics, Sample, load_microscope
from ._forward_model import ForwardModel, counts_to_electrons
from ._inputs import CalibrationInputs
from ._metrics import decorrelation_resolution, psnr, ringing, ssim
from ._noise_estimate import NoiseEstimate, NoiseEstimateError, estimate_noise
from ._quality_bench import Scene, run_bench
from ._run import CalibrationError, CalibrationSettings, run_calibration

__all__ = [
    "CalibrationBundle",
    "CalibrationError",
    "CalibrationInputs",
    "CalibrationSettings",
    "Camera",
    "ForwardModel",
    "MicroscopeConfig",
    "NoiseEstimate",
    "NoiseEstimateError",
    "Optics",
    "Sample",
    "Scene",
    "counts_to_electrons",
    "decorrelation_resolution",
    "estimate_noise",
    "load_microscope",
    "psnr",
    "ringing",
    "run_bench",
    "run_calibration",
    "ssim",
]
