"""A SIM illumination pattern (`SimParameters`), apart from the reconstruction that finds and
uses it (engines/_sim.py): an acquisition plan carries one over the wire, and the client side of
the daemon imports no scipy."""

from __future__ import annotations

from typing import Self

import numpy as np
from pydantic import Field, model_validator

from livedecon.engines._configfile import StrictModel


class SimParameters(StrictModel):
    """The illumination, per angle: pattern vector, phase of each frame, modulation depth."""

    k: list[tuple[float, float]] = Field(description="(ky, kx) cycles per output pixel")
    phases: list[list[float]] = Field(description="radians, per angle and phase")
    modulation: list[float] = Field(description="per angle; 0: no pattern found there")
    output_pixel_um: float = Field(gt=0)

    def k_per_um(self) -> np.ndarray:
        return np.asarray(self.k) / self.output_pixel_um

    def angles_deg(self) -> np.ndarray:
        k = np.asarray(self.k)
        return np.degrees(np.arctan2(k[:, 0], k[:, 1]))

    def periods_um(self) -> np.ndarray:
        return 1.0 / np.linalg.norm(self.k_per_um(), axis=1)

    @model_validator(mode="after")
    def _one_entry_per_angle(self) -> Self:
        if not len(self.k) == len(self.phases) == len(self.modulation):
            raise ValueError(
                f"a pattern has one k, one list of phases and one modulation per angle:"
                f" got {len(self.k)}, {len(self.phases)} and {len(self.modulation)}"
            )
        return self
