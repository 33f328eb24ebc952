"""Command line of the data layer.

  python -m fedfms_jax.data synth --out DIR [--sites N] [--per-site N] [--size S]
  python -m fedfms_jax.data inspect --layout {fedfms,folders,volumes,synthetic} [--root DIR]
      [--json] [--skip-bad]
  python -m fedfms_jax.data bench --layout synthetic [--image-size 1024] [--batch-size 4]

Bad input ends with a message naming the file and a non-zero exit; inspect then still lists
every bad input it finds (in the volumes layout: every case whose label grid is off). With
--json the last line printed is one JSON object (the summary, or {"error": ..., "bad": [...]}).
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import logging
import sys
import time

from fedfms_jax.data.readers import LAYOUTS, load_sites
from fedfms_jax.data.records import DataError
from fedfms_jax.data.summary import format_summary, summarise_sites
from fedfms_jax.data.synthetic import make_synthetic_sites, write_sites


def _key_values(items: list[str], flag: str) -> dict:
    """['a=1', 'b=(0.5, 99.5)'] -> {'a': 1, 'b': (0.5, 99.5)}; plain words stay strings."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: {flag} expects key=value, got {item!r}")
        try:
            out[key.replace("-", "_")] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key.replace("-", "_")] = text
    return out


def _label_map(text: str | None) -> dict[int, int] | None:
    """'1:1,2:1' -> {1: 1, 2: 1}."""
    if not text:
        return None
    try:
        return {int(k): int(v) for k, v in (pair.split(":") for pair in text.split(","))}
    except ValueError:
        raise SystemExit(f"error: --label-map expects raw:class pairs like 1:1,2:1, got {text!r}")


def _synthetic_options(args) -> dict:
    return {"num_sites": args.num_sites, "per_site": args.per_site, "image_size": args.size,
            "kind": args.kind, "volumes": args.volumes, "depth": args.depth}


def _add_synthetic_flags(parser, sites_flags: tuple[str, ...]) -> None:
    group = parser.add_argument_group("synthetic data")
    group.add_argument(*sites_flags, dest="num_sites", type=int, default=4, help="sites")
    group.add_argument("--per-site", type=int, default=96,
                       help="training records of the largest site")
    group.add_argument("--size", type=int, default=128, help="image side in pixels")
    group.add_argument("--kind", choices=("medical", "natural"), default="medical")
    group.add_argument("--volumes", action="store_true",
                       help="render 3-D cases cut into 2.5-D slices")
    group.add_argument("--depth", type=int, default=16, help="slices per synthetic volume")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedfms_jax.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write the embedded synthetic data set to disk")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--format", choices=("folders", "fedfms"), default="folders",
                       help="on-disk layout (default: PNG image folders)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--num-classes", type=int, default=1)
    _add_synthetic_flags(synth, ("--sites", "--num-sites"))

    inspect = commands.add_parser("inspect", help="per-site counts, shapes, labels")
    inspect.add_argument("--layout", choices=LAYOUTS, required=True)
    inspect.add_argument("--root", help="data root (not for --layout synthetic)")
    inspect.add_argument("--json", action="store_true",
                         help="end with one JSON line holding the summary")
    inspect.add_argument("--skip-bad", action="store_true",
                         help="skip bad inputs, count and list them, instead of stopping")
    inspect.add_argument("--sites", help="comma-separated site names to read (default all)")
    inspect.add_argument("--num-classes", type=int, default=1)
    inspect.add_argument("--label-map", help="raw:class pairs, e.g. 1:1,2:1")
    inspect.add_argument("--unmapped", choices=("error", "background"), default="error")
    inspect.add_argument("--val-fraction", type=float, default=0.2)
    inspect.add_argument("--seed", type=int, default=0)
    inspect.add_argument("--sample", type=int, default=0,
                         help="examine at most N records per split for pixel statistics")
    inspect.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                         help="layout option, e.g. keep_empty=0.2 or window='(-160,240)'")
    _add_synthetic_flags(inspect, ("--num-sites",))

    bench = commands.add_parser("bench", help="pipeline throughput (records/s) on one site")
    bench.add_argument("--layout", choices=LAYOUTS, default="synthetic")
    bench.add_argument("--root")
    bench.add_argument("--site", help="site to read (default: the first)")
    bench.add_argument("--num-classes", type=int, default=1)
    bench.add_argument("--image-size", type=int, default=1024)
    bench.add_argument("--batch-size", type=int, default=4)
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--epochs", type=int, default=2)
    bench.add_argument("--augment", action="store_true")
    bench.add_argument("--prompt", choices=("none", "box", "points"), default="none")
    bench.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    _add_synthetic_flags(bench, ("--num-sites",))
    return parser


def _synth(args) -> int:
    start = time.perf_counter()
    sites = make_synthetic_sites(seed=args.seed, num_classes=args.num_classes,
                                 **_synthetic_options(args))
    out = write_sites(sites, args.out, layout=args.format, num_classes=args.num_classes)
    for name, site in sites.items():
        print(f"{name}: train {site.num_train}, val {site.num_val}")
    print(f"wrote {sum(s.num_train + s.num_val for s in sites.values())} records to {out} "
          f"({args.format} layout) in {time.perf_counter() - start:.1f}s")
    return 0


def _inspect(args) -> int:
    options = _key_values(args.option, "--option")
    if args.layout == "synthetic":
        options = {**_synthetic_options(args), **options}
    load = functools.partial(
        load_sites, args.layout, args.root, sites=args.sites.split(",") if args.sites else None,
        num_classes=args.num_classes, label_map=_label_map(args.label_map),
        unmapped=args.unmapped, val_fraction=args.val_fraction, seed=args.seed, **options)
    try:
        sites, first_error = load(skip_bad=args.skip_bad), None
    except DataError as error:
        if args.skip_bad:
            raise
        # Training would stop here; read on past bad inputs to list every one of them (the
        # summary lists them, so the readers' warnings would only repeat them).
        readers_log = logging.getLogger("fedfms_jax.data.readers")
        level = readers_log.level
        readers_log.setLevel(logging.ERROR)
        try:
            sites, first_error = load(skip_bad=True), error
        except DataError:
            raise error from None
        finally:
            readers_log.setLevel(level)
    summary = {"layout": args.layout, "root": args.root, "num_classes": args.num_classes,
               **summarise_sites(sites, args.sample or None)}
    print(format_summary(summary))
    bad = summary["totals"]["skipped"]
    if first_error is not None:
        print(f"error: {first_error}", file=sys.stderr)
        print(f"{bad} bad inputs, listed above; training stops at the first (data.skip_bad=True "
              "or --skip-bad leaves them out)", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": str(first_error), "path": first_error.path,
                              "problem": first_error.problem, "bad": summary["skipped"]}))
        return 1
    if bad:
        print(f"skipped {bad} bad inputs (--skip-bad)")
    if args.json:
        print(json.dumps(summary, sort_keys=False))
    return 0


def _bench(args) -> int:
    from fedfms_jax.data.pipeline import make_pipeline  # grain loads slowly; only here

    options = _key_values(args.option, "--option")
    if args.layout == "synthetic":
        options = {**_synthetic_options(args), **options}
    sites = load_sites(args.layout, args.root, sites=[args.site] if args.site else None,
                       num_classes=args.num_classes, **options)
    name, site = next(iter(sites.items()))
    pipeline = make_pipeline(site.train, image_size=args.image_size,
                             batch_size=args.batch_size, num_threads=args.threads,
                             num_epochs=args.epochs, augment=args.augment, prompt=args.prompt,
                             num_classes=args.num_classes)
    iterator = iter(pipeline)
    next(iterator)  # thread start-up is not throughput
    start, records = time.perf_counter(), 0
    for batch in iterator:
        records += int(batch["valid"].sum())
    seconds = time.perf_counter() - start
    print(f"{name}: {records} records at {args.image_size}px, batch {args.batch_size}, "
          f"{args.threads} threads: {records / seconds:.1f} records/s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"synth": _synth, "inspect": _inspect, "bench": _bench}
    try:
        return commands[args.command](args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": str(error), "path": error.path, "problem": error.problem}))
        return 1
    except (ValueError, TypeError) as error:  # bad options, e.g. an unknown layout option
        print(f"error: {error}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": str(error)}))
        return 2


if __name__ == "__main__":
    sys.exit(main())
