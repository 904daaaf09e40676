"""Side-by-side of the method presets at an equal budget on real sounds; prints JSON.

    python benchmarks/ablation.py [--minutes 20] [--presets clap finelap flam mgaclap slap]
                                  [--out runs/ablation] [--esc50 DIR] [key=value ...]
    python benchmarks/ablation.py --minutes 0.5 --presets clap finelap --eval-limit 40   # smoke run

Protocol (the same for every preset; only objectives and heads differ, see configs/):
1. Data: 10 s soundscapes with strong labels and captions mixed by `finelap synth` from the
   ESC-50-format folder's train folds (default 1-3) and test fold (default 4), exactly as
   benchmarks/esc50_dev.py makes them (its soundscapes are reused when present, else the same
   synth command is run), plus the train-fold clips themselves (caption-only stream).
2. Training: each preset from configs/<preset>.yaml with the same seed, data, batch size and
   wall-clock budget (`--minutes`, train.max_minutes); no validation during training, so the whole
   budget is spent on steps. Steps per budget differ by method (their losses cost differently).
3. Evaluation on the test fold through `finelap.Pipeline` (what a user gets from the
   checkpoint: FLAM's logit adjustment is applied automatically) and `finelap.eval.tasks`:
   - zero-shot top-1 over the class names (prompt template from the checkpoint) on the test-fold
     clips;
   - text-to-audio R@1 with every caption of the test-fold soundscapes as a query;
   - SED PSDS1 on the test-fold soundscapes, one prompt per class name;
   - grounding PSDS: each (soundscape, event label) pair is one query, the label's natural phrase
     from the soundscapes' phrase bank (e.g. "a car horn honking") used verbatim, its ground
     truth the segments of that label's events in that soundscape.
4. Output: <out>/ablation.json, <out>/ablation.md (one row per preset) and <out>/ablation.png (grouped
   bars), rewritten after every preset; JSON on stdout.
Extra `key=value` arguments are config overrides for every preset (e.g. data.batch_size=16).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ESC = REPO.parent / "shared" / "data" / "esc50-dev"
DEFAULT_PRESETS = ["clap", "finelap", "flam", "mgaclap", "slap"]

# what train_preset reports (kept from the previous ablation.json by --eval-only)
TRAIN_KEYS = ("train_seconds", "batch_size", "clip_seconds", "loss_terms", "last_logged_step", "last_logged_train_loss")

# (json key, column title, evaluator result key)
HEADLINE = [
    ("zeroshot_top1", "zero-shot top-1", "top1_accuracy"),
    ("text_to_audio_R@1", "T2A R@1", "text_to_audio_R@1"),
    ("sed_PSDS1", "SED PSDS1", "PSDS1"),
    ("grounding_PSDS", "grounding PSDS", "grounding_PSDS"),
]
SECONDARY = [
    ("zeroshot_top5", "top5_accuracy"),
    ("audio_to_text_R@1", "audio_to_text_R@1"),
    ("text_to_audio_R@10", "text_to_audio_R@10"),
    ("sed_PSDS2", "PSDS2"),
    ("sed_PSDS1_alpha_st0", "PSDS1_alpha_st0"),
    ("sed_frame_AUROC", "frame_AUROC"),
    ("grounding_frame_AUROC", "grounding_frame_AUROC"),
    ("grounding_event_F1", "grounding_event_F1"),
]


# ----------------------------------------------------------------------------- data


def _soundscapes_match(scapes: Path, esc_csv: Path, train_folds: list[int], test_fold: int) -> str | None:
    """None when the soundscapes in `scapes` were mixed from this CSV's folds; else why not."""
    try:
        splits = json.loads((scapes / "splits.json").read_text())
    except (OSError, ValueError) as e:
        return f"cannot read {scapes / 'splits.json'} ({e})"
    if sorted(splits.get("train", {}).get("folds", [])) != sorted(train_folds) or splits.get("val", {}).get("folds") != [test_fold]:
        return f"{scapes} was mixed from folds {splits.get('train', {}).get('folds')}/{splits.get('val', {}).get('folds')}"
    with open(esc_csv, encoding="utf-8-sig", newline="") as f:
        stems = {Path(r["filename"]).stem for r in csv.DictReader(f)}
    with open(scapes / "val" / "manifest.jsonl", encoding="utf-8") as f:
        for line in f:
            for s in json.loads(line).get("sources", []):
                if s.get("source") not in stems:
                    return f"{scapes} uses source {s.get('source')!r}, which is not in {esc_csv}"
    return None


def prepare_data(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Soundscapes (reused or synthesised) and the ESC clip manifests. Returns paths and clips."""
    from finelap.cli import main as cli
    from finelap.data.manifests import read_esc50_csv, write_manifest

    esc = Path(args.esc50)
    esc_csv = esc / "meta" / "esc50.csv"
    data_dir = Path(args.data) if args.data else (REPO / "runs" / "esc50_dev" if esc.resolve() == ESC.resolve() else out / "data")
    scapes = data_dir / "soundscapes"
    t0 = time.time()
    synthesised = False
    if (scapes / "val" / "manifest.jsonl").exists():
        why = _soundscapes_match(scapes, esc_csv, args.train_folds, args.test_fold)
        if why:
            raise SystemExit(f"ablation: cannot reuse soundscapes: {why}; pass --data to a new folder")
    else:
        folds = ",".join(str(f) for f in args.train_folds)
        rc = cli(["synth", "--pool", str(esc_csv), "--audio-dir", str(esc / "audio"), "--out", str(scapes),
                  "--splits", f"train={args.train_soundscapes},val={args.val_soundscapes}",
                  "--split-folds", f"train={folds}", f"val={args.test_fold}",
                  "--seed", "0", "--workers", str(args.workers), "--no-plot"])  # fmt: skip
        if rc:
            raise SystemExit(f"ablation: finelap synth failed (exit {rc})")
        synthesised = True
    clips = read_esc50_csv(esc_csv, esc / "audio")
    train_clips = [c for c in clips if int(c.meta["fold"]) in args.train_folds]
    test_clips = [c for c in clips if int(c.meta["fold"]) == args.test_fold]
    if not train_clips or not test_clips:
        raise SystemExit(f"ablation: {esc_csv} has no clips in folds {args.train_folds} (train) or {args.test_fold} (test)")
    # our own copies (not the other benchmark's files): cheap, and never written concurrently
    mdir = out / "data"
    mdir.mkdir(parents=True, exist_ok=True)
    write_manifest(mdir / "esc_train.jsonl", train_clips)
    write_manifest(mdir / "esc_test.jsonl", test_clips)
    return {
        "scapes": scapes,
        "train": [str(scapes / "train" / "manifest.jsonl"), str(mdir / "esc_train.jsonl")],
        "test_clips": test_clips,
        "classes": sorted({lab for c in clips for lab in c.labels}),
        "synth_seconds": round(time.time() - t0, 1) if synthesised else 0.0,
        "data_dir": str(data_dir),
    }


def grounding_items(scape_clips: list, bank_path: Path) -> tuple[list, dict[str, str]]:
    """One GroundingItem per soundscape: a phrase per distinct event label, whose segments are
    that label's events. Phrases come from the phrase bank (first variant), else the label."""
    from finelap.data.manifests import GroundingItem, GroundingPhrase

    variants: dict[str, list[str]] = {}
    if bank_path.exists():
        bank = json.loads(bank_path.read_text())
        variants = {k: v.get("variants", []) for k, v in bank.get("entries", {}).items()}
    phrase_of: dict[str, str] = {}
    items = []
    for c in scape_clips:
        by_label: dict[str, list[tuple[float, float]]] = {}
        for e in c.events:
            by_label.setdefault(e.label, []).append((float(e.onset), float(e.offset)))
        if not by_label:
            continue
        phrases = []
        for lab, segs in sorted(by_label.items()):
            phrase = phrase_of.setdefault(lab, (variants.get(lab) or [lab.replace("_", " ")])[0])
            phrases.append(GroundingPhrase(phrase, sorted(segs)))
        items.append(GroundingItem(c.audio, c.captions[0] if c.captions else "", phrases, c.duration))
    return items, phrase_of


# ----------------------------------------------------------------------------- train + eval


def train_preset(preset: str, data: dict[str, Any], args: argparse.Namespace, out: Path) -> tuple[Path, dict[str, Any]]:
    from finelap.config import load_run_config
    from finelap.train.loop import train

    run_dir = out / preset
    overrides = [
        f"data.train=[{','.join(data['train'])}]",
        "data.val=[]",
        f"train.seed={args.seed}",
        f"train.max_minutes={args.minutes}",
        "train.max_steps=1000000",
        f"train.warmup_steps={args.warmup}",
        f"train.lr={args.lr}",
        f"train.schedule={args.schedule}",
        "train.eval_every=0",
        "train.ckpt_every=0",
        f"train.out_dir={run_dir}",
        *([f"train.num_threads={args.threads}"] if args.threads else []),
    ]
    config = REPO / "configs" / f"{preset}.yaml"
    cfg = load_run_config(config, [*overrides, *args.overrides])
    crops = cfg.audio.clip_seconds < cfg.audio.max_seconds  # SLAP trains on whole clips: never crop it
    if crops and args.crop_seconds:  # the user's own overrides still win
        cfg = load_run_config(config, [*overrides, f"audio.clip_seconds={args.crop_seconds}", *args.overrides])
    t0 = time.time()
    final = train(cfg, progress=False)
    wall = time.time() - t0
    rows = []
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    last = rows[-1] if rows else {}
    info = {
        "train_seconds": round(wall, 1),
        "batch_size": cfg.data.batch_size,
        "clip_seconds": cfg.audio.clip_seconds if crops else None,
        "loss_terms": cfg.loss.terms(),
        # the last logged row (every train.log_every steps; a budget stop may fall between rows)
        "last_logged_step": int(float(last["step"])) if last else None,
        "last_logged_train_loss": float(last["train/loss"]) if last else None,
    }
    return final, info


def evaluate_preset(final: Path, preset: str, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from finelap.data.manifests import read_manifest
    from finelap.eval.metrics import PSDS1_PARAMS
    from finelap.eval.tasks import evaluate_grounding, evaluate_retrieval, evaluate_sed, evaluate_zeroshot
    from finelap.infer import Pipeline

    pipe = Pipeline.from_pretrained(final, device=args.eval_device)
    fns = pipe.evaluatable(name=preset)  # prompts built by the evaluators, as `finelap eval` does
    scapes = read_manifest(data["scapes"] / "val" / "manifest.jsonl")
    test_clips = data["test_clips"]
    if args.eval_limit:
        scapes, test_clips = scapes[: args.eval_limit], test_clips[: args.eval_limit]
    t0 = time.time()
    res = {
        "zeroshot": evaluate_zeroshot(fns, test_clips, labels=data["classes"]),
        "retrieval": evaluate_retrieval(fns, scapes),
        # PSDS1 with alpha_st = 0 as a diagnostic: it tells a low PSDS1 caused by uneven classes
        # (alpha_st = 1 subtracts the spread of the per-class TPRs) from one caused by poor localisation
        "sed": evaluate_sed(fns, scapes, classes=data["classes"],
                            psds_variants={"PSDS1_alpha_st0": {**PSDS1_PARAMS, "alpha_st": 0.0}}),
    }
    res["sed"].update(res["sed"].pop("psds_variants"))
    items, _ = grounding_items(scapes, data["scapes"] / "phrase_bank.json")
    res["grounding"] = evaluate_grounding(fns, items)
    out: dict[str, Any] = {}
    for key, _, src in HEADLINE:
        out[key] = next(r[src] for r in res.values() if src in r)
    for key, src in SECONDARY:
        out[key] = next((r[src] for r in res.values() if src in r), None)
    out.update(
        eval_seconds=round(time.time() - t0, 1),
        calibrated_frame_scores=bool(pipe.has_calibration),
        prompt_template=pipe.prompt_template,
        n_zeroshot_clips=res["zeroshot"]["n_items"],
        n_classes=res["zeroshot"]["n_classes"],
        n_soundscapes=res["retrieval"]["n_items"],
        n_captions=res["retrieval"]["n_captions"],
        n_sed_events=res["sed"]["n_events"],
        sed_classes_with_PSDS1_above_0=sum(1 for v in res["sed"]["per_class"].values() if (v.get("PSDS1") or 0) > 0),
        n_sed_classes=len(res["sed"]["per_class"]),
        n_grounding_queries=res["grounding"]["n_queries"],
        skipped_files=sum(len(r.get("skipped", [])) for r in res.values()),
    )
    return out


# ----------------------------------------------------------------------------- report


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.3f}"
    return str(v)


def markdown(result: dict[str, Any]) -> str:
    rows = result["presets"]
    lines = [
        "# Preset ablation",
        "",
        f"Equal budget: {result['minutes_per_preset']} min of training per preset on {result['device']}, seed "
        f"{result['seed']}, the same data. Test fold {result['test_fold']}"
        + (f" (first {result['eval_limit']} clips/soundscapes only)" if result["eval_limit"] else "")
        + f". Prompt template: `{result['prompt_template']}`. LR {result.get('lr')} ({result.get('schedule')}, "
        f"{result.get('warmup_steps')} warm-up steps); presets that crop train on {result.get('crop_seconds')}-s crops, "
        "slap on whole clips.",
        "",
        "| preset | steps | " + " | ".join(t for _, t, _ in HEADLINE)
        + " | SED frame AUROC | grounding frame AUROC | zero-shot top-5 | PSDS1, alpha_st = 0 | last train loss |",
        "|---|---:|" + "---:|" * (len(HEADLINE) + 5),
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |" + " |" * (len(HEADLINE) + 5))
            continue
        cells = [_fmt(r.get("steps"))] + [_fmt(r.get(k)) for k, _, _ in HEADLINE]
        cells += [_fmt(r.get(k)) for k in ("sed_frame_AUROC", "grounding_frame_AUROC", "zeroshot_top5", "sed_PSDS1_alpha_st0",
                                           "last_logged_train_loss")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Protocol: zero-shot top-1 over the class names on the test-fold clips; text-to-audio R@1 with each "
        "soundscape caption as a query; SED PSDS1 (dtc = gtc = 0.7, alpha_ct = 0, alpha_st = 1, max eFPR 100) "
        "with one prompt per class; grounding PSDS (dtc = gtc = 0.5) with one query per (soundscape, event label), "
        "the label's phrase-bank phrase. FLAM's frame scores are logit-adjusted (p / (p + sigmoid(beta))). "
        "'PSDS1, alpha_st = 0' is a diagnostic, not a DCASE metric: PSDS1's detection criteria without its "
        "penalty on the spread of the per-class TPRs.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Grouped bars of the headline metrics plus the frame AUROCs, one bar per preset."""
    from finelap.eval.plots import plot_comparison

    rows = {k: v for k, v in result["presets"].items() if "error" not in v}
    if rows:
        metrics = [(k, t) for k, t, _ in HEADLINE] + [("sed_frame_AUROC", "SED frame AUROC"),
                                                      ("grounding_frame_AUROC", "grounding frame AUROC")]
        plot_comparison(rows, metrics, path, title=f"Presets at {result['minutes_per_preset']} min each "
                                                   f"({result['device']}), test fold {result['test_fold']}")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget per preset")
    ap.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, help="configs/<preset>.yaml to compare")
    ap.add_argument("--out", default=str(REPO / "runs" / "ablation"))
    ap.add_argument("--esc50", default=str(ESC), help="ESC-50-format folder (audio/, meta/esc50.csv)")
    ap.add_argument("--data", default=None,
                    help="folder holding soundscapes/ (default: runs/esc50_dev for the bundled data, shared with esc50_dev.py)")
    ap.add_argument("--train-folds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--test-fold", type=int, default=4)
    ap.add_argument("--train-soundscapes", type=int, default=2000)
    ap.add_argument("--val-soundscapes", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2, help="synth worker processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=30, help="train.warmup_steps")
    ap.add_argument("--lr", type=float, default=2e-3, help="train.lr for every preset")
    ap.add_argument("--schedule", default="constant",
                    help="train.schedule; constant by default: steps per budget differ by preset, so a decay "
                         "defined in steps would end at a different point of each preset's budget")
    ap.add_argument("--crop-seconds", type=float, default=5.0,
                    help="audio.clip_seconds for presets that crop (all but slap, which trains on whole clips); "
                         "ESC-50 clips are 5 s; 0 keeps the config's value")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for training (default: torch's)")
    ap.add_argument("--eval-device", default="auto", help="device for evaluation (auto: cuda if available)")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test clips/soundscapes only")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the presets' existing <out>/<preset>/final")
    ap.add_argument("overrides", nargs="*", help="config overrides for every preset, e.g. data.batch_size=16")
    args = ap.parse_args(argv)
    for p in args.presets:
        if not (REPO / "configs" / f"{p}.yaml").exists():
            ap.error(f"no preset config configs/{p}.yaml")
    if args.minutes <= 0:
        ap.error("--minutes must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    esc = Path(args.esc50)
    if not (esc / "meta" / "esc50.csv").exists():
        print(json.dumps({"error": f"ESC-50 data not found at {esc}"}))
        return 1
    import torch

    if args.eval_device == "auto":
        args.eval_device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, out)

    from finelap.eval.report import to_jsonable
    from finelap.train.checkpoint import load_checkpoint
    from finelap.utils import write_json_atomic, write_text_atomic

    rows: dict[str, dict[str, Any]] = {}
    template = None
    previous: dict[str, Any] = {}  # --eval-only keeps the training facts of the run being re-evaluated
    if args.eval_only and (out / "ablation.json").exists():
        previous = json.loads((out / "ablation.json").read_text()).get("presets", {})
    for preset in args.presets:
        t0 = time.time()
        try:
            if args.eval_only:
                final = out / preset / "final"
                info = {k: v for k, v in previous.get(preset, {}).items() if k in TRAIN_KEYS}
            else:
                print(f"ablation: {preset}: training for {args.minutes} min", file=sys.stderr, flush=True)
                final, info = train_preset(preset, data, args, out)
            ckpt = load_checkpoint(final, training_state=False)
            row = {"steps": ckpt.step, **info}
            if info.get("train_seconds") and ckpt.step:
                row["sec_per_step_incl_setup"] = round(info["train_seconds"] / ckpt.step, 3)
            print(f"ablation: {preset}: {ckpt.step} steps; evaluating", file=sys.stderr, flush=True)
            row.update(evaluate_preset(final, preset, data, args))
            template = template or row.get("prompt_template")
            row["checkpoint"] = str(final)
        except Exception as e:  # one broken preset must not hide the others' results
            import traceback

            traceback.print_exc()
            row = {"error": f"{type(e).__name__}: {e}"}
        row["total_seconds"] = round(time.time() - t0, 1)
        rows[preset] = row
        result = to_jsonable({
            "benchmark": "ablation",
            "minutes_per_preset": args.minutes,
            "seed": args.seed,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch_threads": args.threads or torch.get_num_threads(),
            "lr": args.lr,
            "schedule": args.schedule,
            "warmup_steps": args.warmup,
            "crop_seconds": args.crop_seconds,
            "train_folds": args.train_folds,
            "test_fold": args.test_fold,
            "eval_limit": args.eval_limit,
            "prompt_template": template,
            "synth_seconds": data["synth_seconds"],
            "data_dir": data["data_dir"],
            "overrides": args.overrides,
            "presets": rows,
        })  # fmt: skip
        # after every preset, so that an interrupted run keeps the finished rows
        write_json_atomic(out / "ablation.json", result)
        write_text_atomic(out / "ablation.md", markdown(result))
        plot(result, out / "ablation.png")
    print(json.dumps(result, indent=2))
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
