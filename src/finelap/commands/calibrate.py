"""Choose detection settings on validation data and store them in the checkpoint.

Examples:
  finelap calibrate --checkpoint runs/finelap/final --data val.jsonl
  finelap calibrate --checkpoint CKPT --data strong.tsv --audio-dir audio/ --durations durations.tsv --out CKPT_calibrated

Searches a global threshold, per-class thresholds (classes with at least --min-class-events
validation events; shrunk toward the global one), the median filter and the minimum duration and
merge gap (seconds) that maximise collar-based event F1 (micro average; the criterion is stored
with the settings). The frame scores are computed once; the search over thresholds is exact and
vectorised. The result goes into the checkpoint's config.json (`config.eval.calibration`, written
atomically); detect, ground, eval and Pipeline then use it by default.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory (or run directory: its latest checkpoint)")
    p.add_argument("--data", required=True, help="validation data with strong labels: JSONL manifest with events, or DCASE strong-label TSV")
    p.add_argument("--audio-dir", default=None, help="audio folder for TSV file names")
    p.add_argument("--durations", default=None, help="DCASE durations TSV (filename, duration) for a strong-label TSV")
    p.add_argument("--labels", default=None, help="classes to calibrate, ';'-separated (default: every event label in the data)")
    p.add_argument("--min-class-events", type=int, default=5, metavar="N",
                   help="a class gets its own threshold only with at least N validation events")  # fmt: skip
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write the calibrated checkpoint here (a copy); default: update --checkpoint in place")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when the checkpoint has EMA weights")


def store_calibration(checkpoint: str | Path, record: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write `record` into the checkpoint's config.json as `config.eval.calibration` and return
    the checkpoint directory written. config.json is replaced atomically (a crash leaves the old
    one); with `out` (a different directory) the checkpoint is first copied there, via a hidden
    temporary directory renamed into place."""
    import json
    import os
    import shutil

    from ..errors import CheckpointError
    from ..checkpoint import CONFIG_FILE
    from ..utils import write_json_atomic

    src = Path(checkpoint)
    if not (src / CONFIG_FILE).is_file():
        raise CheckpointError(f"{src}: not a checkpoint directory (no {CONFIG_FILE})")
    dst = src if out is None or Path(out).resolve() == src.resolve() else Path(out)
    if dst != src:
        if dst.exists():
            raise CheckpointError(f"{dst}: already exists; choose a new --out directory")
        tmp = dst.with_name(f".{dst.name}.tmp-calibrate")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.replace(tmp, dst)
    meta = json.loads((dst / CONFIG_FILE).read_text(encoding="utf-8"))
    ev = meta.setdefault("config", {}).setdefault("eval", {})
    rec = dict(record)
    if "calibration" not in ev:  # a checkpoint from before the field existed: its hash ignores the key
        rec["added_key"] = True
    ev["calibration"] = rec
    write_json_atomic(dst / CONFIG_FILE, meta)
    return dst


def calibrate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    audio_dir: str | None = None,
    durations: str | None = None,
    labels: Sequence[str] | None = None,
    min_class_events: int = 5,
    device: str = "cpu",
    use_ema: bool = True,
    clips: Sequence[Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Calibrate a checkpoint on validation data (see the module docstring); returns (the
    checkpoint written, the calibration record). `clips` skips reading `data` (the trainer passes
    its validation clips; `data` is then only the name recorded)."""
    from ..data.manifests import load_clips
    from ..errors import FinelapError
    from ..eval.tasks import calibrate_detection
    from ..infer import Pipeline
    from ..checkpoint import latest_checkpoint

    ckpt = Path(checkpoint)
    if ckpt.is_dir() and not (ckpt / "config.json").exists():
        ckpt = latest_checkpoint(ckpt) or ckpt
    if clips is None:  # data errors are reported before the model loads
        clips = load_clips(data, audio_dir=audio_dir, durations=durations, check_audio=False)
    if not any(c.events for c in clips):
        raise FinelapError(f"{data}: no clip has strong labels (events with onset/offset); calibration needs them")
    if out is not None and Path(out).exists() and Path(out).resolve() != ckpt.resolve():
        raise FinelapError(f"{out}: already exists; choose a new --out directory (or leave it out to update {ckpt} in place)")
    pipe = Pipeline.from_pretrained(ckpt, device=device, use_ema=use_ema)
    record = calibrate_detection(pipe.evaluatable(str(ckpt)), list(clips), classes=labels, min_class_events=min_class_events, data_name=str(data))
    record["step"] = int(getattr(pipe.checkpoint, "step", 0) or 0)
    record["use_ema"] = bool(pipe.use_ema)
    return store_calibration(ckpt, record, out), record


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
