"""STEM HAADF through abTEM: a probe scanned at given positions, multislice, annular detector.

The probe is scanned at arbitrary positions (:class:`abtem.CustomScan`), so a scan-distorted frame
is rendered by scanning the probe at the distorted positions themselves (no resampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from generators.tem.hrtem import abtem_config

__all__ = ["HAADF", "haadf_signal"]


@dataclass(frozen=True)
class HAADF:
    """Probe and detector.

    Parameters
    ----------
    voltage_kv : float
    semiangle_mrad : probe convergence semi-angle, mrad
    inner_mrad, outer_mrad : annular detector angles, mrad
    defocus_a : probe defocus, Å
    cs_a : probe Cs, Å
    sampling_a : simulation sampling, Å
    slice_thickness_a : Å
    """

    voltage_kv: float
    semiangle_mrad: float
    inner_mrad: float
    outer_mrad: float
    defocus_a: float = 0.0
    cs_a: float = 0.0
    sampling_a: float = 0.1
    slice_thickness_a: float = 2.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def haadf_signal(atoms, positions_a: np.ndarray, stage: HAADF, max_batch: int = 32,
                 fft: str = "numpy") -> np.ndarray:
    """Fraction of the probe intensity reaching the annular detector at each position.

    Parameters
    ----------
    atoms : ase.Atoms, the cell is the (periodic) extent
    positions_a : (..., 2) probe positions (x, y), Å

    Returns
    -------
    ndarray, shape ``positions_a.shape[:-1]``, float32
    """
    import abtem

    pos = np.asarray(positions_a, np.float64)
    flat = pos.reshape(-1, 2)
    with abtem_config(fft):
        pot = abtem.Potential(atoms, sampling=stage.sampling_a,
                              slice_thickness=stage.slice_thickness_a, projection="infinite",
                              parametrization="lobato")
        probe = abtem.Probe(energy=stage.voltage_kv * 1e3, semiangle_cutoff=stage.semiangle_mrad,
                            defocus=stage.defocus_a, Cs=stage.cs_a)
        det = abtem.AnnularDetector(inner=stage.inner_mrad, outer=stage.outer_mrad)
        meas = probe.scan(pot, scan=abtem.CustomScan(flat), detectors=det, max_batch=max_batch)
        out = np.asarray(meas.compute().array, np.float32).reshape(pos.shape[:-1])
        del meas, pot, probe
    return out
