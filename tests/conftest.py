import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def _thread_runs(fn):
    """``fn()`` under 1 and under all Numba threads."""
    import numba

    old = numba.get_num_threads()
    out = []
    try:
        for t in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(t)
            out.append(fn())
    finally:
        numba.set_num_threads(old)
    return out


@pytest.fixture
def thread_runs():
    """``thread_runs(fn)``: the results of ``fn()`` under 1 and under all Numba threads, a list
    (for checks that a kernel gives the same bits for any thread count)."""
    return _thread_runs
