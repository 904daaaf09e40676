"""Build the built-in default sound pool: real-sound single-event clips rendered offline.

Examples:
  finelap corpus --out demo_out/pool
  finelap corpus --list
  finelap corpus --out pool_small --classes piano,dog --per-class 4

Renders General MIDI instruments, drum hits and sound effects with fluidsynth and a GM soundfont
(Debian: fluidsynth, fluid-soundfont-gm) and men's, women's and whispered speech with espeak-ng.
Missing tools are reported with the apt-get command that installs them, and the pool is built
from what is available; with none at all it falls back to procedurally synthesised sounds.
Writes OUT/audio/<class>/<n>.flac, OUT/manifest.jsonl, OUT/classes.txt and OUT/sources.json, and
reuses OUT when it already holds a pool built with the same configuration.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output folder (required unless --list)")
    p.add_argument("--per-class", type=int, default=8, help="clips per class")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same pool)")
    p.add_argument("--workers", type=int, default=2, help="parallel renders (output does not depend on it)")
    p.add_argument("--classes", default=None,
                   help="comma-separated class slugs or labels to build (default: all that can be rendered)")
    p.add_argument("--soundfont", default=None,
                   help="GM .sf2 to use (default: $FINELAP_SOUNDFONT, then /usr/share/sounds/sf2, /usr/share/soundfonts)")
    p.add_argument("--synthetic", choices=("auto", "always", "never"), default="auto",
                   help="procedural tones/noise: only when no real source is available (auto), also add them, or never")
    p.add_argument("--min-duration", type=float, default=1.0, help="shortest clip, seconds")
    p.add_argument("--max-duration", type=float, default=4.0, help="longest clip, seconds")
    p.add_argument("--sample-rate", type=int, default=16000, help="output sample rate, Hz")
    p.add_argument("--force", action="store_true", help="rebuild even if OUT holds a pool with the same configuration")
    p.add_argument("--list", action="store_true", help="list the classes and whether this machine can render them, then exit")


def run(args: argparse.Namespace) -> int:
    import time

    from ..demo import corpus
    from ..errors import ConfigError

    only = [c for c in args.classes.split(",") if c.strip()] if args.classes else None
    if args.list:
        ts = corpus.detect_tools(soundfont=args.soundfont)
        for line in ts.missing:
            print(f"# {line}")
        for c in corpus.default_classes() + corpus.procedural_classes():
            why = corpus._availability(c, ts)  # noqa: SLF001 - same package
            if c.source == "procedural":
                state = "fallback only (or --synthetic always)"
            else:
                state = "ok" if why is None else f"skipped: {why}"
            print(f"{c.slug:20s} {c.label:30s} {c.source:10s} {state}")
        return 0
    if not args.out:
        raise ConfigError("--out is required (the folder to write the pool to)")
    t0 = time.perf_counter()
    res = corpus.build_corpus(
        args.out, per_class=args.per_class, seed=args.seed, workers=args.workers, classes=only,
        soundfont=args.soundfont, synthetic=args.synthetic, sample_rate=args.sample_rate,
        min_duration=args.min_duration, max_duration=args.max_duration, force=args.force,
    )
    took = time.perf_counter() - t0
    verb = "reused" if res.reused else f"built in {took:.1f} s"
    extra = f", {len(res.skipped_clips)} clip(s) skipped" if res.skipped_clips else ""
    kind = " (PROCEDURAL FALLBACK: no real-sound tools)" if res.synthetic else ""
    print(f"corpus: {len(res.clips)} clips in {len(res.classes)} classes{kind}{extra}, {verb}: {res.manifest}")
    return 0
