"""Forward model, camera noise, PSF, fixed-pattern noise, metrics and calibration runs."""
