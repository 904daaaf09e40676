"""Choose detection settings on validation data and store them in the checkpoint (the library
side of `finelap calibrate`; the trainer calls it at the end of a run with validation events).

Searches a global threshold, per-class thresholds (classes whose validation events come from at
least `min_class_events` distinct recordings where the data name them, else that many events; see
`eval.tasks.class_support`; shrunk toward the global one), the median filter and the minimum
duration and merge gap (seconds) that maximise collar-based event F1 (micro average; the
criterion is stored with the settings); see `eval.tasks.calibrate_detection`. The result goes into the checkpoint's
config.json (`config.eval.calibration`, written atomically); detect, ground, eval and Pipeline
then use it by default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = ["calibrate_checkpoint", "store_calibration"]


def store_calibration(checkpoint: str | Path, record: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write `record` into the checkpoint's config.json as `config.eval.calibration` and return
    the checkpoint directory written. config.json is replaced atomically (a crash leaves the old
    one); with `out` (a different directory) the checkpoint is first copied there, via a hidden
    temporary directory renamed into place."""
    import json
    import os
    import shutil

    from .errors import CheckpointError
    from .checkpoint import CONFIG_FILE
    from .utils import write_json_atomic

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
    from .data.manifests import load_clips
    from .errors import FinelapError
    from .eval.tasks import calibrate_detection
    from .infer import Pipeline
    from .checkpoint import latest_checkpoint

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
