"""Where every random number of a dataset comes from (DESIGN.md §2).

Sample ``i`` draws only from ``SeedSequence(root_seed, spawn_key=(i,))``.  A specimen (shared by
several samples) draws from ``SeedSequence(root_seed, spawn_key=(SPECIMEN_TAG, j))``, a stream no
sample key can reach (sample indices are < 2**62).  Both depend only on (root seed, index), so a
dataset is bit-identical whatever the number of workers and any sample can be regenerated alone.
"""

from __future__ import annotations

import numpy as np

SPECIMEN_TAG = 2**62 + 0x5EC


def sample_rng(root_seed: int, index: int) -> np.random.Generator:
    """Generator of sample ``index``."""
    return np.random.default_rng(np.random.SeedSequence(root_seed, spawn_key=(int(index),)))


def specimen_rng(root_seed: int, specimen_id: int) -> np.random.Generator:
    """Generator of specimen ``specimen_id``."""
    return np.random.default_rng(
        np.random.SeedSequence(root_seed, spawn_key=(SPECIMEN_TAG, int(specimen_id)))
    )
