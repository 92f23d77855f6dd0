"""Micro-Manager side: pycromanager and pymmcore-plus hooks, and the simulated microscope."""
