"""emtwin's physics: specimens, scan, contrast, optics and detector models (no files, no CLI).

Stages follow the ``params = stage.sample(rng)`` / ``out = stage.apply(inp, params)`` split:
all randomness comes from a :class:`numpy.random.Generator` passed in.
"""
