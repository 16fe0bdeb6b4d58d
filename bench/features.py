"""Generation speed with every issue-4 feature on against the plain Voronoi pipeline, one run.

Both pipelines are built from recipe texts (below) of the same size, grains, samples per
specimen, instrument and detector; "all features" switches on every ``specimen.features`` switch
of the recipe schema (grain-size control, twins, roughness, elongation, sub-grains, orientation
gradients, phases, particles) and every ``artefacts`` switch (scratches, pits, dust,
contamination, charging, data bar).  Left aside: grain growth (a separate specimen kind, as the
issue says), and the two *alternatives* to a plain setting rather than additions to it —
hard-core seeds (``specimen.seeds: hardcore``, measured slightly faster than Poisson seeds here)
and optical colour rendering (``contrast.mode``, RGB output).  The default samples per specimen,
4, is the recipe default (``samples: 64``, ``specimens: 16``) used by the shipped recipes.  Each pipeline is
warmed up (Numba compilation, first specimen) on other indices, then ``--n`` samples are
generated in memory (``pipe.generate(i)``, no file) in interleaved rounds (plain, features,
plain, ...; the same sample indices for every pipeline, so both see the same specimens and the
same machine load) and the rate in samples/s (all samples over all rounds' time) is printed with
the ratio all-features / plain and the per-round ratios.  Target (issue 4): ratio ≥ 1/3.  Specimen draws (the Laguerre
fit, sub-grain polygons) are paid once per specimen, every ``--per-specimen`` samples.

Usage::

    python bench/features.py [--size 256] [--n 128] [--per-specimen 4] [--rounds 8]
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


def _rate(pipe, start: int, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(start, start + n):
        pipe.generate(i)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="image side in px (default 256)")
    ap.add_argument("--n", type=int, default=128, help="timed samples per pipeline (default 128)")
    ap.add_argument("--per-specimen", type=int, default=4,
                    help="samples per specimen (default 4: the recipe default 64 / 16)")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time each feature alone (ratio to plain, same rounds)")
    args = ap.parse_args()

    from twin.generate import build_pipeline
    from twin.recipe import parse_recipe
    from twin.shards import tune_allocator

    # the allocator settings of every generating process (twin generate / generate_dataset): without
    # them the page faults of the per-sample arrays vary from run to run (see tune_allocator)
    tuned = tune_allocator()

    warm = 2 * args.per_specimen
    total = warm + args.n
    specimens = -(-total // args.per_specimen)
    plain_text = PLAIN.format(size=args.size, total=total, specimens=specimens)
    feat_text = plain_text.replace("specimen: {grains_per_field: [80, 160]}",
                                   "specimen:\n  grains_per_field: [80, 160]" + FEATURES)
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
    print(f"size {args.size}x{args.size}, {rounds} x {chunk} samples each, "
          f"{args.per_specimen} per specimen, allocator tuned as in generation: {tuned}")
    for k, v in rate.items():
        print(f"{k:22s} : {v:8.1f} samples/s   ratio to plain {v / rate['plain']:6.3f}")
    print("per-round ratios all/plain: " + " ".join(f"{x:.3f}" for x in per_round))
    print(f"ratio all/plain        : {rate['all features'] / rate['plain']:8.3f}  "
          "(target >= 0.333)")


if __name__ == "__main__":
    main()
