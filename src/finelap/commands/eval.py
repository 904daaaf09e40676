"""Evaluate a checkpoint with the field's protocols; writes OUT.json, OUT.md and PNGs.

Examples:
  finelap eval zeroshot  --checkpoint DIR --data meta/esc50.csv --audio-dir audio/ --folds 5 --out zs.json
  finelap eval retrieval --checkpoint DIR --data test.jsonl --out ret.json
  finelap eval sed       --checkpoint DIR --data strong.tsv --audio-dir audio/ --durations durations.tsv --out sed.json
  finelap eval grounding --checkpoint DIR --data grounding.json --audio-dir audio/ --out gr.json
"""
from __future__ import annotations

import argparse

TASK_HELP = {
    "retrieval": "text-audio retrieval (R@1/5/10 both ways, mAP@10; every caption is a query)",
    "zeroshot": "zero-shot classification (top-1/top-5 accuracy, mAP) over class names",
    "sed": "sound event detection (PSDS1, PSDS2, collar event F1, segment F1, frame AUROC)",
    "grounding": "text-to-audio grounding (PSDS dtc=gtc=0.5, event F1, frame AUROC; one query per phrase)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=list(TASK_HELP), help="; ".join(f"{k}: {v}" for k, v in TASK_HELP.items()))
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (or run directory: its latest checkpoint)")
    p.add_argument("--data", required=True, help="JSONL manifest, ESC-50 CSV, DCASE strong-label TSV, AudioGrounding JSON or class folders")
    p.add_argument("--audio-dir", default=None, help="audio folder for CSV/TSV/grounding file names")
    p.add_argument("--durations", default=None, help="DCASE durations TSV (filename, duration) for a strong-label TSV")
    p.add_argument("--folds", default=None, help="ESC-50 folds to evaluate, e.g. 5 or 4,5")
    p.add_argument("--labels", default=None, help="class names separated by ';' or ',' (quote to keep a comma), or @FILE "
                   "with one per line (default: from the data)")
    p.add_argument("--template", default=None, help="prompt template with one {} (default: the checkpoint's)")
    p.add_argument("--threshold", type=float, default=None, help="detection threshold on probabilities (default: checkpoint's)")
    p.add_argument("--median-filter", type=float, default=None, metavar="S", help="median filter window in seconds (default: checkpoint's)")
    p.add_argument("--min-duration", type=float, default=None, metavar="S", help="drop detections shorter than this (default: checkpoint's)")
    p.add_argument("--merge-gap", type=float, default=None, metavar="S", help="merge detections closer than this (default: checkpoint's)")
    p.add_argument("--out", required=True, help="OUT.json; OUT.md and OUT_*.png are written next to it")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--batch-size", type=int, default=16, help="files encoded together")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when the checkpoint has EMA weights")


def _folds(s: str | None) -> list[int] | None:
    if s is None:
        return None
    from ..errors import FinelapError

    try:
        return [int(x) for x in s.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise FinelapError(f"--folds must be integers like 4 or 4,5, got {s!r}") from None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.manifests import load_clips, read_grounding_json
    from ..errors import FinelapError
    from ..eval.report import write_report
    from ..eval.tasks import TASKS, PostProcess
    from ..infer import Pipeline
    from ..utils import log
    from ._pipeline import log_labels, read_labels

    # user errors that need no model are reported before it loads
    if not Path(args.data).exists():
        raise FinelapError(f"{args.data}: file not found (--data)")
    if args.task == "grounding" and Path(args.data).suffix.lower() != ".json":
        raise FinelapError(f"{args.data}: grounding needs an AudioGrounding JSON file")
    labels = read_labels(args.labels) if args.labels is not None else None
    folds = _folds(args.folds)
    pipe = Pipeline.from_pretrained(args.checkpoint, device=args.device, use_ema=not args.no_ema)
    if labels is not None:
        log_labels(labels)
    fns = pipe.evaluatable(name=str(args.checkpoint), batch_size=args.batch_size)  # prompts: the evaluators' make_prompt

    def settings(queries: list[str], announce_uncalibrated: bool) -> PostProcess:
        """The checkpoint's calibrated detection settings (else its defaults), flags first; says
        once which and where from."""
        st = pipe.detection_settings(queries, args.threshold, args.median_filter, args.min_duration, args.merge_gap,
                                     announce=announce_uncalibrated)  # fmt: skip
        if not announce_uncalibrated:
            log(st.describe())
        return st.postprocess

    data = Path(args.data)
    if args.task == "grounding":
        if data.suffix.lower() != ".json":
            raise FinelapError(f"{data}: grounding needs an AudioGrounding JSON file")
        items = read_grounding_json(data, audio_dir=args.audio_dir)
        # phrases are free text: none is a calibrated class, all use the global settings
        pp = settings([], announce_uncalibrated=False)
        result = TASKS["grounding"](fns, items, postprocess=pp, template=args.template)
    else:
        clips = load_clips(data, audio_dir=args.audio_dir, durations=args.durations, folds=folds,
                           check_audio=False)  # missing files are skipped and reported by the evaluator
        if not clips:
            raise FinelapError(f"{data}: no clips to evaluate")
        if args.task == "retrieval":
            result = TASKS["retrieval"](fns, clips, template=args.template, batch_size=args.batch_size)
        elif args.task == "zeroshot":
            result = TASKS["zeroshot"](fns, clips, labels=labels, template=args.template, batch_size=args.batch_size)
        else:
            classes = labels if labels is not None else sorted({e.label for c in clips for e in c.events})
            result = TASKS["sed"](fns, clips, classes=labels, postprocess=settings(classes, True), template=args.template)
    paths = write_report(result, Path(args.out), checkpoint_config=pipe.checkpoint.meta if pipe.checkpoint is not None else None,
                         extra={"checkpoint": str(args.checkpoint), "data": str(data), "task": args.task},
                         plots=not args.no_plots, sample_rate=pipe.sample_rate)  # fmt: skip
    headline = {k: v for k, v in result.items() if isinstance(v, float)}
    log(f"finelap eval {args.task}: " + ", ".join(f"{k}={v:.4f}" for k, v in headline.items()))
    if args.task == "sed":
        log(f"finelap eval: PSDS on {result['psds_scores']}; PSDS1_raw/PSDS2_raw on raw frame probabilities")
        for block in result["psds"].values():
            if block.get("note"):
                log(f"finelap eval: {block['note']}")
    if result.get("skipped"):
        log(f"finelap eval: skipped {len(result['skipped'])} unreadable file(s); listed in the report")
    log(f"finelap eval: report {paths['md']} (JSON {paths['json']})")
    return 0
