"""Clients of the daemon on the microscope's side: pycromanager and pymmcore-plus hooks, the
display stream and napari viewer of its publications, and the simulated microscope."""
