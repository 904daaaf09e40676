"""Choose detection settings on validation data and store them in the checkpoint.

Examples:
  finelap calibrate --checkpoint runs/finelap/final --data val.jsonl
  finelap calibrate --checkpoint CKPT --data strong.tsv --audio-dir audio/ --durations durations.tsv --out CKPT_calibrated

Searches a global threshold, per-class thresholds (classes with events from at least
--min-class-events distinct recordings, when the data name them, as synthesised soundscapes do;
else with at least that many events; shrunk toward the global one), the median filter and the
minimum duration and merge gap (seconds) that maximise collar-based event F1 (micro average; the criterion is stored
with the settings). The frame scores are computed once; the search over thresholds is exact and
vectorised. The result goes into the checkpoint's config.json (`config.eval.calibration`, written
atomically); detect, ground, eval and Pipeline then use it by default.
"""
from __future__ import annotations

import argparse

from ..calibration import calibrate_checkpoint, store_calibration  # noqa: F401  (the library functions)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory (or run directory: its latest checkpoint)")
    p.add_argument("--data", required=True, help="validation data with strong labels: JSONL manifest with events, or DCASE strong-label TSV")
    p.add_argument("--audio-dir", default=None, help="audio folder for TSV file names")
    p.add_argument("--durations", default=None, help="DCASE durations TSV (filename, duration) for a strong-label TSV")
    p.add_argument("--labels", default=None, help="classes to calibrate, ';'-separated (default: every event label in the data)")
    p.add_argument("--min-class-events", type=int, default=5, metavar="N",
                   help="a class gets its own threshold only with events from at least N distinct recordings "
                        "(when the data name them; else N events)")  # fmt: skip
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write the calibrated checkpoint here (a copy); default: update --checkpoint in place")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when the checkpoint has EMA weights")


def run(args: argparse.Namespace) -> int:
    from ..infer import parse_labels
    from ..utils import log

    labels = parse_labels(args.labels) if args.labels is not None else None
    path, rec = calibrate_checkpoint(args.checkpoint, args.data, out=args.out, audio_dir=args.audio_dir, durations=args.durations,
                                     labels=labels, min_class_events=args.min_class_events, device=args.device,
                                     use_ema=not args.no_ema)  # fmt: skip
    own = rec["class_thresholds"]
    log(f"finelap calibrate: criterion: {rec['criterion']}")
    print(f"threshold {rec['threshold']:.4g} (own thresholds for {len(own)} of {len(rec['classes'])} classes), "
          f"median filter {rec['median_filter_s']:g} s, min duration {rec['min_duration_s']:g} s, merge gap {rec['merge_gap_s']:g} s: "
          f"micro event F1 {rec['score']:.4f} on {rec['n_files']} files / {rec['n_events']} events "
          f"({rec['score_global_threshold']:.4f} with the global threshold only)")  # fmt: skip
    if rec.get("skipped"):
        log(f"finelap calibrate: skipped {len(rec['skipped'])} unreadable file(s), e.g. {rec['skipped'][0]['path']}")
    log(f"finelap calibrate: stored in {path / 'config.json'} (config.eval.calibration)")
    return 0
