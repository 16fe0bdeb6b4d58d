"""Generation speed with every issue-4 feature on against the plain Voronoi pipeline, one run.

Both pipelines are built from recipe texts (below) of the same size, grains, samples per
specimen, instrument and detector; "all features" switches on every ``specimen.features`` switch
of the recipe schema (grain-size control, twins, roughness, elongation, sub-grains, orientation
gradients, phases, particles) and every ``artefacts`` switch (scratches, pits, dust,
contamination, charging, data bar).  Left aside: grain growth (a separate specimen kind, as the
issue says), and the two *alternatives* to a plain setting rather than additions to it —
hard-core seeds (``specimen.seeds: hardcore``, measured slightly faster than Poisson seeds here)
and optical colour rendering (``contrast.mode``, RGB output; ``--mode optical`` compares the
features against plain Voronoi grains both rendered that way).  The default samples per specimen,
4, is the recipe default (``samples: 64``, ``specimens: 16``) used by the shipped recipes.

Two measurements, each in interleaved rounds (plain, features, plain, ...; both pipelines see
the same specimens and the same machine load), rates in samples/s over all rounds' time:

1. **Datasets generated** (the issue's "generation speed"): ``twin.generate.generate_dataset``,
   what ``twin generate`` runs — one process (``workers=1``), the samples written to an HDF5
   dataset with the recipe's default compression and checksums, ``--write-n`` samples per run,
   round ``r`` with root seed ``100 + r`` for both pipelines.  Target (issue 4): ratio ≥ 1/3.
2. **In memory** (the generation work alone, stricter): ``pipe.generate(i)`` for the same sample
   indices in both pipelines, no file; ratio and per-round ratios printed.

Numba threads: as the environment sets them (``NUMBA_NUM_THREADS=1`` gives the per-core figure
of ``twin generate -j 2`` on two cores, whose workers run one thread each).  Specimen draws (the
Laguerre fit, sub-grain polygons) are paid once per specimen, every ``--per-specimen`` samples.

Usage::

    python bench/features.py [--size 256] [--n 128] [--per-specimen 4] [--rounds 8]
                             [--write-n 128] [--write-rounds 2] [--mode sem|optical]

``--mode optical`` renders both pipelines in optical colour (RGB, the colour camera of
``generic-optical``, no scan distortion): the same features switched on against plain Voronoi
colour grains.
"""

from __future__ import annotations

import argparse
import time

PLAIN = """
name: bench-plain
size: [{size}, {size}]
samples: {total}
specimens: {specimens}
seed: 1
specimen: {{grains_per_field: [80, 160]}}
labels: {{names: [grain_id, boundary, twin, twin_boundary, phase]}}
"""

#: ``--mode optical``: both pipelines render optical colour (RGB) through the colour camera
OPTICAL = """instrument: generic-optical
contrast: {mode: optical-colour}
scan: {drift_px: 0, line_jitter_px: 0}
"""

FEATURES = """
  features:
    sizes: {enabled: true, sigma: 0.5}
    twins: {enabled: true, probability: 0.5}
    roughness: {enabled: true, amplitude_px: 3, correlation_px: 25}
    elongation: {enabled: true, ratio: 1.5, angle_deg: 20}
    subgrains: {enabled: true}
    gradients: {enabled: true}
    phases: {enabled: true}
    particles: {enabled: true}
artefacts:
  scratches: {enabled: true}
  pits: {enabled: true}
  dust: {enabled: true}
  contamination: {enabled: true}
  charging: {enabled: true}
  data_bar: {enabled: true}
"""


def _recipe_texts(size: int, total: int, per_specimen: int, mode: str) -> tuple[str, str]:
    """The plain and the all-features recipe texts: ``total`` samples, ``per_specimen`` each."""
    plain = PLAIN.format(size=size, total=total, specimens=-(-total // per_specimen))
    if mode == "optical":
        plain += OPTICAL
    feat = plain.replace("specimen: {grains_per_field: [80, 160]}",
                         "specimen:\n  grains_per_field: [80, 160]" + FEATURES)
    return plain, feat


def _rate(pipe, start: int, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(start, start + n):
        pipe.generate(i)
    return n / (time.perf_counter() - t0)


def _written(recipes: dict, directory, n: int, rounds: int) -> tuple[dict, list[float]]:
    """Seconds per pipeline of ``generate_dataset`` runs of ``n`` samples, interleaved rounds
    (round ``r``: root seed ``100 + r`` for every pipeline), and the per-round ratios."""
    from twin.generate import generate_dataset

    paths = {}
    for k, text in recipes.items():
        paths[k] = directory / f"{len(paths)}.yaml"
        paths[k].write_text(text, encoding="utf-8")
        generate_dataset(paths[k], directory / "warm.h5", n=4, seed=99, progress=False,
                         workers=1, overwrite=True)
    seconds = dict.fromkeys(recipes, 0.0)
    per_round = []
    for r in range(rounds):
        rr = {}
        for k, path in paths.items():
            t0 = time.perf_counter()
            generate_dataset(path, directory / "out.h5", n=n, seed=100 + r, progress=False,
                             workers=1, overwrite=True)
            rr[k] = time.perf_counter() - t0
            seconds[k] += rr[k]
        per_round.append(rr["plain"] / rr["all features"])
    return seconds, per_round


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="image side in px (default 256)")
    ap.add_argument("--n", type=int, default=128, help="timed samples per pipeline (default 128)")
    ap.add_argument("--per-specimen", type=int, default=4,
                    help="samples per specimen (default 4: the recipe default 64 / 16)")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    ap.add_argument("--write-n", type=int, default=128,
                    help="samples per generate_dataset run (default 128)")
    ap.add_argument("--write-rounds", type=int, default=2,
                    help="interleaved generate_dataset rounds (default 2)")
    ap.add_argument("--mode", choices=("sem", "optical"), default="sem",
                    help="rendering of both pipelines: SEM (default) or optical colour (RGB)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each feature alone (ratio to plain, same rounds)")
    args = ap.parse_args()

    import tempfile
    from pathlib import Path

    import numba

    from twin.generate import build_pipeline
    from twin.recipe import parse_recipe
    from twin.shards import tune_allocator

    # the allocator settings of every generating process (twin generate / generate_dataset): without
    # them the page faults of the per-sample arrays vary from run to run (see tune_allocator)
    tuned = tune_allocator()

    warm = 2 * args.per_specimen
    total = warm + args.n
    plain_text, feat_text = _recipe_texts(args.size, total, args.per_specimen, args.mode)
    pipes = {"plain": plain_text, "all features": feat_text}
    if args.breakdown:  # every feature alone: all others switched off
        import re

        for name in re.findall(r"^\s+(\w+): \{enabled: true", FEATURES, flags=re.M):
            alone = re.sub(r"(\w+): \{enabled: true",
                           lambda m: m.group(0) if m.group(1) == name
                           else f"{m.group(1)}: {{enabled: false", feat_text)
            pipes[name] = alone
    built = {k: build_pipeline(parse_recipe(t), None)[0] for k, t in pipes.items()}
    for p in built.values():  # compile kernels, first specimens
        for i in range(warm):
            p.generate(i)
    # interleaved rounds (plain, features, plain, ...) over the same sample indices, so every
    # pipeline sees the same specimens and the same machine load; the rate is all samples over
    # all rounds' time (per-round ratios printed for the spread)
    rounds = max(1, args.rounds)
    chunk = max(1, args.n // rounds)
    seconds = dict.fromkeys(built, 0.0)
    per_round: list[float] = []
    for r in range(rounds):
        start = warm + r * chunk
        rr = {k: _rate(p, start, chunk) for k, p in built.items()}
        for k, v in rr.items():
            seconds[k] += chunk / v
        per_round.append(rr["all features"] / rr["plain"])
    rate = {k: rounds * chunk / t for k, t in seconds.items()}
    print(f"{args.mode} rendering, size {args.size}x{args.size}, "
          f"{args.per_specimen} samples per specimen, "
          f"{numba.get_num_threads()} Numba thread(s), allocator tuned as in generation: {tuned}")
    wn = max(1, args.write_n)
    wr = max(1, args.write_rounds)
    with tempfile.TemporaryDirectory(prefix="emtwin-bench-features-") as tmp:
        texts = dict(zip(("plain", "all features"),
                         _recipe_texts(args.size, wn, args.per_specimen, args.mode)))
        wsec, wround = _written(texts, Path(tmp), wn, wr)
    wrate = {k: wr * wn / t for k, t in wsec.items()}
    print(f"\n1. datasets generated (generate_dataset = twin generate, one process, HDF5 written; "
          f"{wr} x {wn} samples each)")
    for k, v in wrate.items():
        print(f"   {k:22s} : {v:8.1f} samples/s   ratio to plain {v / wrate['plain']:6.3f}")
    print("   per-round ratios all/plain: " + " ".join(f"{x:.3f}" for x in wround))
    print(f"\n2. in memory (pipe.generate, no file; {rounds} x {chunk} samples each)")
    for k, v in rate.items():
        print(f"   {k:22s} : {v:8.1f} samples/s   ratio to plain {v / rate['plain']:6.3f}")
    print("   per-round ratios all/plain: " + " ".join(f"{x:.3f}" for x in per_round))
    w_ratio = wrate["all features"] / wrate["plain"]
    m_ratio = rate["all features"] / rate["plain"]
    print(f"\nratio all/plain, datasets generated : {w_ratio:6.3f}  (target >= 0.333: "
          f"{'MET' if w_ratio >= 1 / 3 else 'NOT MET'})")
    print(f"ratio all/plain, in memory          : {m_ratio:6.3f}  "
          f"({'>=' if m_ratio >= 1 / 3 else '<'} 1/3)")

if __name__ == "__main__":
    main()
