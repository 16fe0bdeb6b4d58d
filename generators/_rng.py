"""Counter-based random streams for Numba kernels.

Numba's own ``np.random`` inside ``@njit(parallel=True)`` keeps one state per thread, so results
would depend on the thread count.  Kernels here instead take a 64-bit key drawn from the caller's
``numpy.random.Generator`` and give every independent unit of work (an image row) its own
xoshiro256** stream seeded by SplitMix64 from ``(key, row)``.  The result is a pure function of the
key: identical for any number of threads.

Distributions: uniform on [0, 1) with 53 random bits, standard normal (Box–Muller; 
(Marsaglia polar pairs), Poisson (multiplication method below λ = 10, Hörmann's PTRS transformed rejection above, as NumPy does).
Their statistics are tested against SciPy's reference distributions in ``tests/test_detector.py``.
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
def _splitmix64(x):
    z = x + _GOLDEN
    z = (z ^ (z >> uint64(30))) * _M1
    z = (z ^ (z >> uint64(27))) * _M2
    return z ^ (z >> uint64(31))


@njit(cache=True, inline="always")
def _rotl(x, k):
    return (x << uint64(k)) | (x >> uint64(64 - k))


@njit(cache=True)
def stream_state(key, stream):
    """Return a fresh xoshiro256** state (4 × uint64) for stream number ``stream`` under ``key``."""
    s = np.empty(4, dtype=np.uint64)
    x = uint64(key) ^ (uint64(stream) * _GOLDEN)
    for j in range(4):
        x = _splitmix64(x + uint64(j))
        s[j] = x
    if s[0] == 0 and s[1] == 0 and s[2] == 0 and s[3] == 0:
        s[0] = uint64(1)
    return s


@njit(cache=True, inline="always")
def next_u64(s):
    result = _rotl(s[1] * uint64(5), 7) * uint64(9)
    t = s[1] << uint64(17)
    s[2] ^= s[0]
    s[3] ^= s[1]
    s[1] ^= s[2]
    s[0] ^= s[3]
    s[2] ^= t
    s[3] = _rotl(s[3], 45)
    return result


@njit(cache=True, inline="always")
def uniform(s):
    """Uniform double on [0, 1)."""
    # the shifted value fits in int64, whose conversion to double is one instruction
    return float(np.int64(next_u64(s) >> uint64(11))) * _INV53


@njit(cache=True, inline="always")
def standard_normal(s):
    """Standard normal deviate (Box–Muller, one of the pair)."""
    u1 = 1.0 - uniform(s)  # (0, 1]
    u2 = uniform(s)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@njit(cache=True, inline="always")
def normal_pair(s):
    """Two independent standard normal deviates (Marsaglia's polar method)."""
    while True:
        u = 2.0 * uniform(s) - 1.0
        v = 2.0 * uniform(s) - 1.0
        q = u * u + v * v
        if 0.0 < q < 1.0:
            f = math.sqrt(-2.0 * math.log(q) / q)
            return u * f, v * f


@njit(cache=True)
def poisson(s, lam):
    """Poisson deviate with mean ``lam`` (≥ 0)."""
    if lam <= 0.0:
        return 0
    if lam < 10.0:
        limit = math.exp(-lam)
        k = 0
        prod = uniform(s)
        while prod > limit:
            k += 1
            prod *= uniform(s)
        return k
    # PTRS: W. Hörmann, "The transformed rejection method for generating Poisson random
    # variables", Insurance: Mathematics and Economics 12 (1993) 39-45.
    slam = math.sqrt(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        u = uniform(s) - 0.5
        v = uniform(s)
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return int(k)
        if k < 0.0 or (us < 0.013 and v > us):
            continue
        loglam = math.log(lam)
        invalpha = 1.1239 + 1.1328 / (b - 3.4)
        if (math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b)) <= (
            -lam + k * loglam - math.lgamma(k + 1.0)
        ):
            return int(k)
