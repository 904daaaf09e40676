"""Shared pieces of the inference commands (classify, detect, ground, embed): model options,
post-processing options, label parsing, input checks and output paths. Heavy imports stay inside
functions so `finelap --help` stays fast."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence


LABELS_HELP = ("labels separated by ';' or ',' (double quotes keep a separator inside a label: "
               "'dog barking;\"rain, heavy\"'), or @FILE with one label per line")


def add_hidden_alias(p: argparse.ArgumentParser, old: str, dest: str, **kwargs: Any) -> None:
    """An old spelling of a flag that still works but is not shown in --help."""
    p.add_argument(old, dest=dest, help=argparse.SUPPRESS, **kwargs)


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True, checkpoint_help: str | None = None) -> None:
    import os

    # `required` is no argparse requirement: a missing checkpoint gets a message that says how to get one
    # (Pipeline.from_pretrained); optional ones (index update reuses the index's) ignore the environment
    p.add_argument("--checkpoint", required=False, default=(os.environ.get("FINELAP_CHECKPOINT") or None) if required else None, metavar="DIR",
                   help=checkpoint_help or "checkpoint directory (or a run directory: its latest checkpoint); default: $FINELAP_CHECKPOINT")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA weights")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="CPU: audio windows encoded in parallel (default: one per torch thread)")
    p.add_argument("--window", type=float, default=60.0, metavar="S",
                   help="streaming window for long audio, seconds (memory grows with it)")  # fmt: skip


def add_post_arguments(p: argparse.ArgumentParser) -> None:
    """Post-processing in seconds; defaults come from the checkpoint's eval section."""
    p.add_argument("--threshold", type=float, default=None, help="probability threshold (default: checkpoint's eval.sed_threshold)")
    p.add_argument("--median-filter", type=float, default=None, metavar="S", help="median filter window in seconds (default: checkpoint's)")
    p.add_argument("--min-duration", type=float, default=None, metavar="S", help="drop segments shorter than this (default: checkpoint's)")
    p.add_argument("--merge-gap", type=float, default=None, metavar="S", help="merge segments closer than this (default: checkpoint's)")
    p.add_argument("--calibrated", choices=("auto", "yes", "no"), default="auto",
                   help="FLAM logit-adjusted probabilities (auto: when the checkpoint has per-text biases)")  # fmt: skip


def check_post_arguments(args: argparse.Namespace) -> None:
    """Range checks of the post-processing flags, before the model loads (the checkpoint's
    defaults, used for flags left out, are checked again by the Pipeline)."""
    from ..errors import ConfigError

    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise ConfigError(f"threshold must be in [0, 1] (a probability), got {args.threshold}")
    for flag, value in (("--median-filter", args.median_filter), ("--min-duration", args.min_duration), ("--merge-gap", args.merge_gap)):
        if value is not None and value < 0:
            raise ConfigError(f"{flag} must be >= 0 seconds, got {value}")


def calibrated(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[args.calibrated]


def post_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(threshold=args.threshold, median_filter_s=args.median_filter, min_duration_s=args.min_duration, merge_gap_s=args.merge_gap)


def load_pipeline(args: argparse.Namespace) -> Any:
    import torch

    from ..errors import ConfigError
    from ..infer import Pipeline

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not args.window > 0:
        raise ConfigError(f"--window must be > 0 seconds, got {args.window}")
    try:  # keep stderr for our one-line messages: no per-tensor "Loading weights" bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    return Pipeline.from_pretrained(args.checkpoint, device=args.device, use_ema=not args.no_ema, window_s=args.window,
                                    workers=args.workers)  # fmt: skip


def read_labels(value: str) -> list[str]:
    """--labels "dog;rain;siren" (';' or ',' separate; double quotes keep a separator inside a
    label), or "@labels.txt" (one label per line, commas kept; '#' starts a comment)."""
    from ..errors import DataFormatError
    from ..infer import parse_labels

    if value.startswith("@"):
        path = Path(value[1:])
        if not path.exists():  # not is_file(): `--labels @<(grep ... labels.txt)` passes a pipe
            raise DataFormatError(path, "label file not found")
        from ..data.manifests import read_text_file  # names the line of bytes that are not UTF-8

        lines = [ln.split("#", 1)[0].strip() for ln in read_text_file(path).splitlines()]
        labels = [ln for ln in lines if ln]
        if not labels:
            raise DataFormatError(path, "empty label list (no labels in the file)")
        return parse_labels(labels)
    return parse_labels(value)


def log_labels(labels: Sequence[str]) -> None:
    """One stderr line saying how many labels were parsed (a mis-split list is seen at once).
    Called once every input is checked and the model loaded, so a user error stays the only line."""
    from ..utils import log

    shown = "; ".join(labels[:8]) + (f"; ... ({len(labels) - 8} more)" if len(labels) > 8 else "")
    log(f"{len(labels)} label{'s' if len(labels) != 1 else ''}: {shown}")


def add_plot_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """--plot, --reference, --log-scale for the detect/ground commands."""
    p.add_argument("--plot", default=None, metavar="PNG", help=f"spectrogram + probability curves + threshold + {what}")
    p.add_argument("--reference", default=None, metavar="TSV",
                   help="with --plot: draw the reference events of this DCASE strong-label TSV "
                        "(filename, onset, offset, event_label; rows of other files are ignored)")  # fmt: skip
    p.add_argument("--log-scale", action="store_true", help="with --plot: probabilities on a log axis")


def read_reference(path: str | None) -> dict[str, list[Any]] | None:
    """A DCASE strong-label TSV as {file base name: [Event]} (None: no --reference). Read before
    the model loads, so a bad file is reported at once."""
    if path is None:
        return None
    from ..data.manifests import read_strong_tsv
    from ..errors import DataFormatError

    p = Path(path)
    if not p.is_file():
        raise DataFormatError(p, "reference TSV not found")
    out: dict[str, list[Any]] = {}
    for name, events in read_strong_tsv(p).items():
        out.setdefault(Path(name).name, []).extend(events)
    return out


def reference_segments(reference: dict[str, list[Any]] | None, audio: Path, queries: Sequence[str], source: str
                       ) -> list[list[tuple[float, float]]] | None:  # fmt: skip
    """Per query, the (onset, offset) of the reference events of `audio` whose label is the
    query (compared case-insensitively). Says in one line what could not be matched."""
    if reference is None:
        return None
    from ..utils import log

    events = reference.get(audio.name)
    if events is None:
        log(f"reference: {source} has no row for {audio.name}; plotted without reference events")
        events = []
    key = lambda s: " ".join(str(s).lower().split())  # noqa: E731
    segs = [[(float(e.onset), float(e.offset)) for e in events if key(e.label) == key(q)] for q in queries]
    unmatched = sorted({e.label for e in events} - {e.label for e in events if key(e.label) in {key(q) for q in queries}})
    if unmatched:
        log(f"reference: {audio.name} also has events of {', '.join(repr(u) for u in unmatched[:5])}, not among the queries")
    return segs


def check_audio_files(paths: Sequence[str]) -> list[Path]:
    """Validate every input file before loading the model: a user error is reported at once,
    naming the file (missing, empty, unsupported, unreadable header)."""
    from ..audio import audio_duration

    out = []
    for p in paths:
        audio_duration(p)  # raises AudioError(path, problem)
        out.append(Path(p))
    return out


def per_file_path(base: str | Path, audio: Path, multiple: bool, suffix: str) -> Path:
    """`base` for a single input; `<base stem>_<audio stem><suffix>` next to it for several."""
    base = Path(base)
    if not multiple:
        return base
    return base.with_name(f"{base.stem}_{audio.stem}{base.suffix or suffix}")


def fmt_prob(p: float) -> str:
    """Probabilities with 3 decimals; tiny ones (untrained or very unsure models) in e-notation."""
    return f"{p:.3f}" if p >= 0.001 or p == 0 else f"{p:.1e}"


def _is_number(x: Any) -> bool:
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return True


def fmt_table(rows: Sequence[Sequence[Any]], header: Sequence[str], indent: str = "  ") -> str:
    """Plain aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_number(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for r in cells:
        lines.append(indent + "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip())
    return "\n".join(lines)
