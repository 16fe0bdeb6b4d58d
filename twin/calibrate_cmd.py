"""``twin calibrate``: estimate an instrument profile from a user's own micrographs.

    twin calibrate IMAGE... -o profile.yaml [--dark DARK...] [--plot diag.png]
                   [--offset COUNTS] [--kind sem|stem|tem|optical] [--base PROFILE]
                   [--name NAME] [--frames | --fields] [--json]

Reads TIFF/PNG/NumPy and vendor files (DM3/DM4, EMD, TIA .emi/.ser; see :mod:`twin.io`), estimates
gain, read noise, offset, fixed pattern, lag, PSF, vignetting and line jitter
(:mod:`twin.calibrate`), and writes a profile that a recipe's ``instrument:`` can point at.
"""

from __future__ import annotations

import argparse
import json
import math

__all__ = ["register"]


def register(subparsers) -> None:
    """Add the ``calibrate`` subcommand (no heavy imports here)."""
    c = subparsers.add_parser(
        "calibrate", help="estimate an instrument profile (noise, PSF, jitter) from real images",
        description="Estimate detector gain, read noise, offset, fixed pattern, lag, PSF, "
                    "vignetting and line jitter from micrographs of one detector setting, and "
                    "write an instrument profile for recipes.")
    c.add_argument("images", nargs="+", metavar="IMAGE",
                   help="micrographs (.tif .png .npy .dm3 .dm4 .emd .ser .emi)")
    c.add_argument("-o", "--output", required=True, help="profile to write (.yaml)")
    c.add_argument("--dark", nargs="+", default=None, metavar="DARK",
                   help="dark / offset-only frames of the same detector (offset, read noise, "
                        "fixed pattern)")
    c.add_argument("--plot", default=None, metavar="PNG", help="write a diagnostic figure")
    c.add_argument("--offset", type=float, default=None,
                   help="known detector offset in counts (when no dark frames are given)")
    c.add_argument("--kind", choices=("sem", "stem", "tem", "optical"), default=None,
                   help="instrument kind (default: from the file metadata, else sem)")
    c.add_argument("--base", default=None,
                   help="profile (name or path) whose values are kept where nothing is estimated "
                        "(default: the generic profile of the kind)")
    c.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--frames", dest="repeated", action="store_const", const=True, default=None,
                   help="the images are repeated frames of one field (default: detected)")
    g.add_argument("--fields", dest="repeated", action="store_const", const=False,
                   help="the images are different fields of view")
    c.add_argument("--json", action="store_true", help="print the estimates as JSON")
    c.set_defaults(func=_cmd_calibrate)


def _fmt(x: float, se: float | None = None, unit: str = "") -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    s = f"{x:.4g}"
    if se is not None and math.isfinite(se):
        s += f" ± {se:.2g}"
    return s + (f" {unit}" if unit else "")


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from twin.calibrate import calibrate, diagnostic_figure, write_profile
    from twin.instrument import load_instrument

    base = None
    if args.base is not None:
        base, _ = load_instrument(args.base)
    cal = calibrate(args.images, dark=args.dark, offset=args.offset, repeated=args.repeated,
                    kind=args.kind or (base.kind if base is not None else None))
    out = write_profile(cal, args.output, name=args.name, base=base)
    if args.plot:
        diagnostic_figure(cal, args.plot)
    if args.json:
        from twin.calibrate import _jsonable

        print(json.dumps(_jsonable(cal.summary()), indent=2))
        return 0
    n = cal.noise
    print(f"calibrated {len(cal.sources)} image(s) ({n.method}, {n.n_blocks} blocks) in "
          f"{cal.seconds:.2f} s; kind {cal.kind}")
    print(f"  gain          {_fmt(n.gain, n.gain_stderr, 'counts/e-')}")
    print(f"  offset        {_fmt(n.offset, None, 'counts')}  [{n.offset_source}]")
    print(f"  read noise    {_fmt(n.readout_sigma, None, 'counts')}  [{n.readout_source}]")
    if cal.dark is not None:
        print(f"  fixed pattern rows {_fmt(cal.dark.row_sigma)}, columns "
              f"{_fmt(cal.dark.col_sigma)} counts")
    lag = n.lag
    print(f"  lag           {_fmt(lag.lag_px, None, 'px') if lag.applied else 'none detected'}")
    if cal.psf is not None:
        print(f"  PSF sigma     {_fmt(cal.psf.sigma_px, cal.psf.stderr, 'px')}  "
              f"[{cal.psf.method}, {cal.psf.n_used}]")
    if cal.jitter is not None:
        print(f"  line jitter   {_fmt(cal.jitter.sigma_px, cal.jitter.stderr, 'px')}")
    if cal.vignetting is not None:
        used = cal.vignetting.as_profile()
        print("  vignetting    " + (", ".join(f"{k}={v:.3g}" for k, v in used.items() if v)
                                    or "none significant"))
    if cal.saturation is not None:
        print(f"  saturation    {cal.saturation:g} counts")
    for w in cal.warnings:
        print(f"  note: {w}")
    print(f"wrote {out}" + (f" and {args.plot}" if args.plot else ""))
    return 0
