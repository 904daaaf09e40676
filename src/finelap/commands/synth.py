"""Mix labelled single-event clips into 10-s soundscapes with exact strong labels and captions.

Examples:
  finelap synth --pool demo_out/pool/manifest.jsonl --out demo_out/soundscapes --splits train=600,val=60,test=100
  finelap synth --pool esc50/meta/esc50.csv --out esc_scenes --split-folds train=1,2,3 val=4 test=5 --workers 2

The pool is an ESC-50 style CSV (with --audio-dir), a folder per class, or a JSONL manifest whose
clips have `labels` or single events. Writes FLAC + manifest.jsonl + DCASE strong.tsv/durations.tsv
per split (or WebDataset shards), each split's own pool clips as sources.jsonl, splits.json,
phrase_bank.json, stats.json and stats.png. Event boundaries are recalibrated to where each event
is audible (A-weighted frame level above --recal-db, default -70 dB). Without --backgrounds a
pink/brown noise floor at --background-db (dBFS RMS) is used so every event's SNR is defined. The
same --seed gives byte-identical output for any --workers. Negative ranges need '=':
--background-db=-40,-30.
"""
from __future__ import annotations

import argparse
import os
from typing import Any


def _range(s: str) -> tuple[float, float]:
    parts = [p for p in s.replace(":", ",").split(",") if p.strip()]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH numbers, got {s!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or vals[0] > vals[1]:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with LOW <= HIGH, got {s!r}")
    return vals[0], vals[1]


def _named(s: str, conv: type, value: str, empty: str) -> dict[str, Any]:
    """NAME=VALUE[,NAME=VALUE...] -> {name: conv(value)} (argparse type helper)."""
    out: dict[str, Any] = {}
    for part in s.split(","):
        if not part.strip():
            continue
        name, eq, v = part.partition("=")
        try:
            if not eq or not name.strip():
                raise ValueError
            out[name.strip()] = conv(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NAME={value}[,NAME={value}...], got {s!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(empty)
    return out


def _splits(s: str) -> dict[str, int]:
    return _named(s, int, "COUNT", "no splits given")


def _fractions(s: str) -> dict[str, float]:
    return _named(s, float, "SHARE", "no split shares given")


def _folds(s: str) -> list[int]:
    try:
        return [int(f) for f in s.split(",") if f.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fold numbers, got {s!r}") from None


def _split_folds(items: list[str]) -> dict[str, list[int]]:
    from ..errors import ConfigError

    out: dict[str, list[int]] = {}
    for item in items:
        name, eq, folds = item.partition("=")
        if not eq or not name.strip():
            raise ConfigError(f"--split-folds expects SPLIT=F1,F2 items, got {item!r}")
        try:
            out[name.strip()] = [int(f) for f in folds.split(",") if f.strip()]
        except ValueError:
            raise ConfigError(f"--split-folds: non-integer fold in {item!r}") from None
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", required=True, help="labelled single-event clips: ESC-50 CSV, folder per class, or manifest .jsonl")
    p.add_argument("--audio-dir", default=None, help="audio folder for a CSV/TSV pool (default: ESC-50 layout next to it)")
    p.add_argument("--backgrounds", default=None, help="background audio: a folder (searched recursively) or a manifest; "
                   "default: a pink/brown noise floor")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--splits", type=_splits, default="train=800,val=100,test=100", help="soundscapes per split")
    p.add_argument("--split-fractions", type=_fractions, default=None, metavar="SPLIT=SHARE,...",
                   help="share of the pool's recordings per split (relative weights, e.g. train=70,val=15,test=15); "
                   "default: proportional to --splits. Fixing it keeps val/test unchanged when train grows")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed and inputs: byte-identical output)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes (does not change the output)")
    p.add_argument("--format", choices=("flac", "webdataset"), default="flac", help="audio output format")
    p.add_argument("--shard-size", type=int, default=1000, help="soundscapes per WebDataset shard")
    p.add_argument("--sample-rate", type=int, default=16000, help="Hz")
    p.add_argument("--duration", type=float, default=10.0, help="soundscape length, seconds")
    p.add_argument("--min-events", type=int, default=1, help="fewest events per soundscape")
    p.add_argument("--max-events", type=int, default=5, help="most events per soundscape")
    p.add_argument("--max-overlap", type=int, default=3, help="most events sounding at once")
    p.add_argument("--snr", type=_range, default="12,20", help="per-event SNR range vs the background, dB")
    p.add_argument("--background-db", type=_range, default="-40,-30",
                   help="background / noise-floor RMS range, dBFS (write --background-db=-40,-30)")
    p.add_argument("--recal-db", type=float, default=-70.0,
                   help="A-weighted frame level (dB re full scale) that marks an event as audible")
    p.add_argument("--split-gap", type=float, default=None,
                   help="split an event's label at inaudible stretches at least this long (s); default: one label per event")
    p.add_argument("--num-captions", type=int, default=3, help="captions per soundscape")
    p.add_argument("--captioner", default=None, help="optional external captioner 'module:function' (events, duration) -> list[str]")
    p.add_argument("--event-labels", choices=("raw", "canonical"), default="raw",
                   help="label events with the pool's labels or the phrase bank's canonical phrase")
    p.add_argument("--folds", type=_folds, default=None, help="use only these ESC-50 folds of the pool, e.g. 1,2,3")
    p.add_argument("--split-folds", nargs="+", default=None, metavar="SPLIT=FOLDS",
                   help="take each split's sources from ESC-50 folds, e.g. train=1,2,3 val=4 test=5")
    p.add_argument("--no-plots", action="store_true", help="skip stats.png")
    from ._pipeline import add_hidden_alias

    add_hidden_alias(p, "--no-plot", dest="no_plots", action="store_true")  # the old spelling


def run(args: argparse.Namespace) -> int:
    from ..data.manifests import load_clips
    from ..data.synth import SynthConfig, synthesize
    from ..errors import ConfigError

    splits = args.splits if isinstance(args.splits, dict) else _splits(args.splits)
    snr = args.snr if isinstance(args.snr, tuple) else _range(args.snr)
    bg_db = args.background_db if isinstance(args.background_db, tuple) else _range(args.background_db)
    if args.workers < 1:
        raise ConfigError("--workers must be >= 1")
    cfg = SynthConfig(
        splits=splits, seed=args.seed, sample_rate=args.sample_rate, duration=args.duration,
        min_events=args.min_events, max_events=args.max_events, max_overlap=args.max_overlap,
        snr_db=snr, background_db=bg_db, recal_db=args.recal_db, split_gap_s=args.split_gap,
        num_captions=args.num_captions, captioner=args.captioner, event_labels=args.event_labels,
        split_folds=_split_folds(args.split_folds) if args.split_folds else None,
        split_fractions=args.split_fractions,  # parsed by argparse (`_fractions`); None: shares follow --splits
        format=args.format, shard_size=args.shard_size,
    )
    pool_path = args.pool
    is_csv = str(pool_path).lower().endswith(".csv")
    if args.folds is not None and not is_csv:
        raise ConfigError("--folds applies to an ESC-50 style CSV pool only")
    if cfg.split_folds is not None and not is_csv:
        raise ConfigError("--split-folds applies to an ESC-50 style CSV pool only")
    # missing/corrupt audio files are skipped and listed by the synthesiser, never fatal here
    clips = load_clips(pool_path, audio_dir=args.audio_dir, folds=args.folds, check_audio=False)
    res = synthesize(clips, args.out, cfg, backgrounds=args.backgrounds, workers=args.workers, plot=not args.no_plots)
    print(res.summary())
    return 0
