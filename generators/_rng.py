"""Counter-based random streams for Numba kernels.

Numba's own ``np.random`` inside ``@njit(parallel=True)`` keeps one state per thread, so results
would depend on the thread count.  Kernels here instead take a 64-bit key drawn from the caller's
``numpy.random.Generator`` and give every independent unit of work (an image row) its own SplitMix64
stream (Steele, Lea & Flood, OOPSLA 2014), started at ``mix(key ⊕ row·γ)``.  The state is one
``uint64`` carried in a register (functions take the state and return the new one), so the result is
a pure function of the key, identical for any number of threads.

Beside the sequential access (:func:`uniform`, the state advanced by one number per call), a
stream can be read counter-based: :func:`uniform_at` returns its ``n``-th number directly and
:func:`substream` starts block ``j`` (numbers ``j·2³² + 1 …``).  The row samplers
:func:`poisson_row` and :func:`normal_row` use this to give item ``c`` of a row fixed numbers, so
that their first pass over a row is branch-free and vectorises (AVX-512), and only the few items
a rejection sampler does not accept at once are finished in a second, scalar pass.

Distributions (exact samplers up to double rounding; their statistics are tested against SciPy's
distributions in ``tests/test_detector.py``):

- uniform on [0, 1) with 53 random bits (:func:`uniform`, :func:`uniform_at`);
- standard normal by the 256-layer Ziggurat of Marsaglia & Tsang, "The Ziggurat method for
  generating random variables", J. Stat. Softw. 5(8), 2000, with the exact tail algorithm
  (:func:`normal`, :func:`normal_row`).  Layer index, sign and the 53-bit abscissa come from
  disjoint bits of one 64-bit output, which avoids the index/value correlation of the original
  32-bit version;
- Poisson (:func:`poisson_row`): inversion by sequential search below λ = 10, Hörmann's PTRS
  transformed rejection from λ = 10 on (W. Hörmann, "The transformed rejection method for
  generating Poisson random variables", Insurance: Mathematics and Economics 12 (1993) 39-45, as
  in NumPy); ``log k!`` is tabulated below :data:`LOG_FACTORIAL_TABLE_SIZE` (the values are
  ``math.lgamma(k + 1)`` themselves).
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
def uniform_at(start, n):
    """Uniform number ``n`` (≥ 1) of the stream whose state is ``start``: the value the
    ``n``-th call of :func:`uniform` would return, computed directly (counter-based access)."""
    z = _mix(start + uint64(n) * _GOLDEN)
    return float(np.int64(z >> uint64(11))) * _INV53


@njit(cache=True, inline="always")
def substream(start, j):
    """State ``start`` advanced by ``j · 2³²`` numbers: the start of block ``j`` of 2³² numbers."""
    return start + (uint64(j) << uint64(32)) * _GOLDEN


# --------------------------------------------------------------------------------------------
# Ziggurat normal (Marsaglia & Tsang 2000), 256 layers of equal area V under exp(-x²/2).

_ZIG_R = 3.6541528853610088  # right edge of the base layer
_ZIG_V = 4.92867323399e-3  # area of every layer (base layer: rectangle + tail)


def _ziggurat_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(k, w, f)`` of Marsaglia & Tsang's ``zigset`` for 53-bit abscissae.

    Layer ``i ≥ 1`` is the rectangle ``[0, x_i] × [f(x_i), f(x_{i−1})]`` (``x_0 = 0``,
    ``x_255 = R``); layer 0 is ``[0, V/f(R)] × [0, f(R)]`` whose part beyond ``R`` stands for the
    tail.  ``w[i]`` scales a 53-bit integer to ``[0, x_i)``; an integer below ``k[i]`` gives an
    abscissa inside the curve for certain (``x < x_{i−1}``, or ``x < R`` for layer 0); ``f[i]`` is
    ``exp(−x_i²/2)``.
    """
    n = 256
    m = 2.0**53
    k = np.zeros(n, dtype=np.uint64)
    w = np.zeros(n, dtype=np.float64)
    f = np.zeros(n, dtype=np.float64)
    q = _ZIG_V / math.exp(-0.5 * _ZIG_R * _ZIG_R)
    k[0] = np.uint64(int(_ZIG_R / q * m))
    k[1] = np.uint64(0)
    w[0] = q / m
    w[n - 1] = _ZIG_R / m
    f[0] = 1.0
    f[n - 1] = math.exp(-0.5 * _ZIG_R * _ZIG_R)
    dn = tn = _ZIG_R
    for i in range(n - 2, 0, -1):
        dn = math.sqrt(-2.0 * math.log(_ZIG_V / dn + math.exp(-0.5 * dn * dn)))
        k[i + 1] = np.uint64(int(dn / tn * m))
        tn = dn
        f[i] = math.exp(-0.5 * dn * dn)
        w[i] = dn / m
    return k, w, f


_ZIG_K, _ZIG_W, _ZIG_F = _ziggurat_tables()


@njit(cache=True, inline="always")
def _zig_first(bits):
    """First Ziggurat step from 64 random bits: ``(x, layer, negative, inside)``; ``x ≥ 0``.

    ``inside`` (about 98.8 %): ``±x`` is the deviate.  Otherwise :func:`_zig_finish` decides."""
    i = bits & uint64(255)
    neg = (bits >> uint64(8)) & uint64(1)
    j = bits >> uint64(11)  # 53 bits
    x = float(np.int64(j)) * _ZIG_W[i]
    return x, i, neg, j < _ZIG_K[i]


@njit(cache=True)
def _zig_finish(x, i, state):
    """Rest of a Ziggurat draw whose first step was not inside: ``(accepted, |z|, new_state)``.

    Layer 0: the tail beyond R by Marsaglia's (1964) exact method (always accepted); other
    layers: the wedge test against ``exp(−x²/2)`` (rejected: the caller starts a new draw)."""
    if i == 0:
        while True:
            u1, state = uniform(state)
            u2, state = uniform(state)
            xx = -math.log(1.0 - u1) / _ZIG_R
            yy = -math.log(1.0 - u2)
            if yy + yy > xx * xx:
                return True, _ZIG_R + xx, state
    u, state = uniform(state)
    return _ZIG_F[i] + u * (_ZIG_F[i - 1] - _ZIG_F[i]) < math.exp(-0.5 * x * x), x, state


@njit(cache=True, inline="always")
def normal(state):
    """One standard normal deviate (Ziggurat); returns ``(z, new_state)``."""
    while True:
        state = state + _GOLDEN
        x, i, neg, inside = _zig_first(_mix(state))
        if not inside:
            inside, x, state = _zig_finish(x, i, state)
        if inside:
            return (-x if neg else x), state


@njit(cache=True)
def normal_row(start, out, scratch):
    """Fill ``out`` (float64, length n) with standard normals, item ``c`` drawn at number ``c + 1``
    of the stream ``start``; the ~1.2 % not accepted at once continue in block ``c + 1``
    (:func:`substream`).  A function of ``start`` and n only; ``scratch``: int64, length ≥ n."""
    n = out.size
    for c in range(n):  # branch-free: vectorises
        x, i, neg, inside = _zig_first(_mix(start + uint64(c + 1) * _GOLDEN))
        out[c] = (-x if neg else x) if inside else np.nan
    m = 0
    for c in range(n):
        scratch[m] = c
        m += out[c] != out[c]
    for t in range(m):
        c = scratch[t]
        x, i, neg, inside = _zig_first(_mix(start + uint64(c + 1) * _GOLDEN))
        st = substream(start, c + 1)
        inside, x, st = _zig_finish(x, i, st)
        if inside:
            out[c] = -x if neg else x
        else:
            out[c], st = normal(st)


# --------------------------------------------------------------------------------------------
# Poisson.

#: ``log k!`` is read from a table for ``k`` below this size (``math.lgamma`` above).
LOG_FACTORIAL_TABLE_SIZE = 4096
_LOG_FACTORIAL = np.array([math.lgamma(k + 1.0) for k in range(LOG_FACTORIAL_TABLE_SIZE)])
_INV_INT = np.array([0.0] + [1.0 / k for k in range(1, 256)])  # 1/k for the inversion search
_SMALL_LAMBDA = 10.0  # inversion below, PTRS from here on (PTRS needs λ ≥ 10)


@njit(cache=True, inline="always", error_model="numpy")
def _ptrs_attempt(start, c, lam):
    """PTRS attempt for item ``c`` from numbers ``2c + 1``, ``2c + 2`` of stream ``start``
    (branch-free): ``(k, fast, valid, v, us, b, a)``.  ``fast``: accepted by the squeeze;
    ``valid``: not rejected before the exact log test (:func:`_ptrs_log_test`)."""
    u = uniform_at(start, 2 * c + 1) - 0.5
    v = uniform_at(start, 2 * c + 2)
    b = 0.931 + 2.53 * math.sqrt(lam)
    a = -0.059 + 0.02483 * b
    vr = 0.9277 - 3.6224 / (b - 2.0)
    us = 0.5 - abs(u)
    kf = math.floor((2.0 * a / us + b) * u + lam + 0.43)
    fast = (us >= 0.07) & (v <= vr)
    valid = (kf >= 0.0) & ((us >= 0.013) | (v <= us))
    return kf, fast, valid, v, us, b, a


@njit(cache=True, inline="always", error_model="numpy")
def _ptrs_log_test(kf, lam, v, us, b, a):
    """PTRS's exact acceptance ``log(v/α/(a/us² + b)) ≤ log pmf(k) = k log λ − λ − log k!``."""
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    kk = min(max(kf, 0.0), LOG_FACTORIAL_TABLE_SIZE - 1.0)
    log_fact = (_LOG_FACTORIAL[int(kk)] if kf < LOG_FACTORIAL_TABLE_SIZE
                else math.lgamma(kf + 1.0))
    return math.log(v * inv_alpha / (a / (us * us) + b)) <= kf * math.log(lam) - lam - log_fact


@njit(cache=True, inline="always", error_model="numpy")
def _poisson_inversion(u, lam):
    """Poisson(``lam``) deviate for λ < 10 from one uniform ``u``: the first ``k`` whose
    cumulative pmf exceeds ``u`` (sequential search from 0)."""
    if lam <= 0.0:
        return 0
    p = math.exp(-lam)
    cdf = p
    k = 0
    # P(k ≥ 255) < 1e-300 for λ < 10: the cap only guards against a rounded cdf below u
    while u >= cdf and k < 255:
        k += 1
        p *= lam * _INV_INT[k]
        cdf += p
    return k


@njit(cache=True, error_model="numpy")
def poisson_row(start, lam, out, scratch):
    """Fill ``out`` (float64, length n) with Poisson(``lam[c]``) deviates (``lam`` ≥ 0, length n).

    Item ``c`` draws from numbers ``2c + 1``, ``2c + 2`` of block ``t`` of the stream ``start``
    (:func:`substream`; block 0 is ``start`` itself) in its ``t``-th round:

    - round 0, all items, branch-free (it vectorises): PTRS's first attempt and its squeeze
      (immediate acceptance of about 60–85 % of the items with λ ≥ 10);
    - then the pending items only: λ < 10 by inversion from number ``2c + 1`` of block 0; λ ≥ 10
      PTRS's exact log test of the round-0 attempt, then new attempts in blocks 1, 2, … until
      accepted (about 15 % of items need block 1).

    Each item's deviate is exactly that of PTRS (or inversion) with independent uniforms; the row
    is a function of ``(start, lam)`` alone.  ``scratch``: int64, length ≥ n.
    """
    n = lam.size
    for c in range(n):
        kf, fast, valid, v, us, b, a = _ptrs_attempt(start, c, lam[c])
        out[c] = kf if (fast & (lam[c] >= _SMALL_LAMBDA)) else -1.0
    m = 0
    for c in range(n):
        scratch[m] = c
        m += out[c] < 0.0
    block = 0
    while m > 0:
        bstart = substream(start, block)
        left = 0
        for t in range(m):
            c = scratch[t]
            lc = lam[c]
            if lc < _SMALL_LAMBDA:  # only in round 0
                out[c] = _poisson_inversion(uniform_at(bstart, 2 * c + 1), lc)
                continue
            kf, fast, valid, v, us, b, a = _ptrs_attempt(bstart, c, lc)
            ok = (block > 0) & fast
            if not ok and valid:
                ok = _ptrs_log_test(kf, lc, v, us, b, a)
            out[c] = kf
            scratch[left] = c
            left += not ok
        m = left
        block += 1


@njit(cache=True)
def fill_normal(key, n):
    """``n`` standard normals as one row of :func:`normal_row` under ``key`` (tests, benchmarks)."""
    out = np.empty(n, dtype=np.float64)
    normal_row(stream_start(key, 0), out, np.empty(n, dtype=np.int64))
    return out


@njit(cache=True)
def fill_normal_sequential(key, n):
    """``n`` standard normals by repeated :func:`normal` on stream 0 of ``key`` (tests)."""
    out = np.empty(n, dtype=np.float64)
    st = stream_start(key, 0)
    for i in range(n):
        out[i], st = normal(st)
    return out


@njit(cache=True)
def fill_poisson(key, lam, n):
    """``n`` Poisson(``lam``) deviates, int64, as one row of :func:`poisson_row` under ``key``."""
    out = np.empty(n, dtype=np.float64)
    poisson_row(stream_start(key, 0), np.full(n, float(lam)), out, np.empty(n, dtype=np.int64))
    return out.astype(np.int64)
