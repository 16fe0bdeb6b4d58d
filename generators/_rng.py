"""Counter-based random streams for Numba kernels.

Numba's own ``np.random`` inside ``@njit(parallel=True)`` keeps one state per thread, so results
would depend on the thread count.  Kernels here instead take a 64-bit key drawn from the caller's
``numpy.random.Generator`` and give every independent unit of work (an image row) its own SplitMix64
stream (Steele, Lea & Flood, OOPSLA 2014), started at ``mix(key ⊕ row·γ)``.  The state is one
``uint64`` carried in a register (functions take the state and return the new one), so the result is
a pure function of the key, identical for any number of threads.

Distributions: uniform on [0, 1) with 53 random bits, standard normal pairs (Marsaglia's polar
method), Poisson (multiplication method below λ = 10, Hörmann's PTRS transformed rejection above, as
NumPy does).  Their statistics are tested against SciPy's distributions in ``tests/test_detector.py``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, uint64

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_INV53 = 1.0 / 9007199254740992.0  # 2**-53


@njit(cache=True, inline="always")
def _mix(z):
    z = (z ^ (z >> uint64(30))) * _M1
    z = (z ^ (z >> uint64(27))) * _M2
    return z ^ (z >> uint64(31))


@njit(cache=True)
def stream_start(key, stream):
    """Initial state of stream number ``stream`` under ``key``."""
    return _mix(uint64(key) ^ (uint64(stream) * _GOLDEN) ^ _M1)


@njit(cache=True, inline="always")
def uniform(state):
    """Uniform double on [0, 1); returns ``(u, new_state)``."""
    state = state + _GOLDEN
    z = _mix(state)
    # the shifted value fits in int64, whose conversion to double is one instruction
    return float(np.int64(z >> uint64(11))) * _INV53, state


@njit(cache=True, inline="always")
def normal_pair(state):
    """Two independent standard normal deviates; returns ``(z0, z1, new_state)``."""
    while True:
        u, state = uniform(state)
        v, state = uniform(state)
        u = 2.0 * u - 1.0
        v = 2.0 * v - 1.0
        q = u * u + v * v
        if 0.0 < q < 1.0:
            f = math.sqrt(-2.0 * math.log(q) / q)
            return u * f, v * f, state


@njit(cache=True)
def poisson(state, lam):
    """Poisson deviate with mean ``lam`` (≥ 0); returns ``(k, new_state)``."""
    if lam <= 0.0:
        return 0, state
    if lam < 10.0:
        limit = math.exp(-lam)
        k = 0
        prod, state = uniform(state)
        while prod > limit:
            k += 1
            u, state = uniform(state)
            prod *= u
        return k, state
    # PTRS: W. Hörmann, "The transformed rejection method for generating Poisson random
    # variables", Insurance: Mathematics and Economics 12 (1993) 39-45.
    slam = math.sqrt(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        u, state = uniform(state)
        v, state = uniform(state)
        u -= 0.5
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return int(k), state
        if k < 0.0 or (us < 0.013 and v > us):
            continue
        loglam = math.log(lam)
        invalpha = 1.1239 + 1.1328 / (b - 3.4)
        if (math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b)) <= (
            -lam + k * loglam - math.lgamma(k + 1.0)
        ):
            return int(k), state
