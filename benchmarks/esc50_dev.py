"""The default recipe (configs/sfx.yaml: pretrained aisfx tower, frozen and cached) on real sounds:
../shared/data/esc50-dev. Prints JSON (the last thing printed).

    python benchmarks/esc50_dev.py                  # the whole benchmark, default budget
    python benchmarks/esc50_dev.py --steps 500      # another budget (in optimizer steps)
    python benchmarks/esc50_dev.py --skip-unseen    # only the 40-class run

1. Soundscapes (10 s, 44.1 kHz, strong labels, captions) are mixed with `finelap synth` from
   ESC-50 folds 1-3 (`train`; `calib`: other mixes of the same folds, for choosing detection
   settings) and fold 4 (`val`, the test set). Splits follow folds: no recording crosses them.
2. Run "all40": trained for `--steps` steps on the fold 1-3 soundscapes plus the fold 1-3 clips
   (label phrases, and the clips' Freesound titles as extra captions unless --no-titles), then
   calibrated on `calib` (`finelap calibrate`: threshold, median filter, min duration).
3. Run "unseen10": 10 of the 40 classes, drawn with a fixed seed and printed, are removed from
   every training input (their clips, titles, and every soundscape containing them); the same
   recipe and budget; scored 10-way on those classes' fold-4 clips.
4. Scores on fold 4: zero-shot top-1 over the 40 class names (320 clips); SED PSDS1 (DCASE
   parameters, after the checkpoint's post-processing, and on raw scores) and grounding frame
   AUROC on the fold-4 soundscapes; text-to-audio retrieval with the clips' Freesound titles as
   queries (a hit: any clip carrying that title, i.e. the same source recording).
Budgets are steps; wall time and the machine's load average are printed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ESC = REPO.parent / "shared" / "data" / "esc50-dev"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def clean_title(title: str) -> str:
    """A Freesound title as a caption: no file extension, separators as spaces, no bare numbers."""
    t = re.sub(r"\.(wav|mp3|aif+|flac|ogg|m4a)$", "", title.strip(), flags=re.I)
    t = re.sub(r"[_\-\.]+", " ", t)
    t = re.sub(r"\b\d+\b", " ", t)
    return re.sub(r"\s+", " ", t).strip().lower()


def read_titles(esc: Path) -> dict[str, str]:
    import csv

    out = {}
    p = esc / "meta" / "attribution.tsv"
    if p.exists():
        with open(p, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                t = clean_title(row.get("freesound_title") or "")
                if t:
                    out[row["filename"]] = t
    return out


def synth(cli, esc: Path, out: Path, splits: dict[str, tuple[int, str]], seed: int, workers: int) -> None:
    """`finelap synth` of splits {name: (count, "folds")} into `out` (skipped when already there)."""
    if all((out / s / "manifest.jsonl").exists() for s in splits):
        return
    rc = cli(["synth", "--pool", str(esc / "meta" / "esc50.csv"), "--audio-dir", str(esc / "audio"), "--out", str(out),
              "--splits", ",".join(f"{s}={n}" for s, (n, _) in splits.items()),
              "--split-folds", *[f"{s}={f}" for s, (_, f) in splits.items()], "--sample-rate", "44100",
              "--seed", str(seed), "--workers", str(workers), "--no-plot"])
    if rc:
        raise SystemExit(f"finelap synth failed for {sorted(splits)} (exit {rc})")


def train_run(name: str, cfg_path: Path, train: list[Path], calib: Path, steps: int, out: Path, overrides: list[str]) -> tuple[Path, dict]:
    from finelap.config import load_run_config
    from finelap.train.loop import train as run_train

    run_dir = out / f"run_{name}"
    ov = [
        f"data.train=[{','.join(str(p) for p in train)}]",
        f"data.val=[{calib}]",
        f"train.max_steps={steps}",
        f"train.warmup_steps={min(50, steps // 10)}",
        f"train.out_dir={run_dir}",
        "train.eval_every=0",
        "train.ckpt_every=0",
        *overrides,
    ]
    cfg = load_run_config(cfg_path, ov)
    t0 = time.time()
    final = run_train(cfg, progress=False)
    return final, {"train_seconds": round(time.time() - t0, 1), "steps": cfg.train.max_steps, "batch_size": cfg.data.batch_size}


def evaluate(final: Path, val_clips: list, scapes: list, classes: list[str], titles: dict[str, str], bank: Path) -> dict[str, Any]:
    import numpy as np

    from finelap.eval.tasks import evaluate_grounding, evaluate_sed, evaluate_zeroshot
    from finelap.infer import Pipeline

    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import grounding_items

    pipe = Pipeline.from_pretrained(final)
    fns = pipe.evaluatable(name=str(final))
    res: dict[str, Any] = {}
    zs = evaluate_zeroshot(fns, val_clips, labels=classes)
    res["zeroshot_top1_fold4"] = zs["top1_accuracy"]
    res["zeroshot_top5_fold4"] = zs.get("top5_accuracy")
    # the checkpoint's own post-processing (calibrated after training), as `finelap eval sed` uses it
    st = pipe.detection_settings(classes, announce=False)
    sed = evaluate_sed(fns, scapes, classes=classes, postprocess=st.postprocess)
    res["sed"] = {k: v for k, v in sed.items() if isinstance(v, (int, float, str))}
    res["sed"]["settings"] = st.describe()
    items, _ = grounding_items(scapes, bank)
    gr = evaluate_grounding(fns, items, postprocess=pipe.detection_settings([], announce=False).postprocess)
    res["grounding"] = {k: v for k, v in gr.items() if isinstance(v, (int, float, str))}
    # text-to-audio retrieval with the Freesound titles: one query per distinct title
    audio = [c.audio for c in val_clips]
    emb = pipe.embed_audio(audio)
    by_title: dict[str, list[int]] = {}
    for i, c in enumerate(val_clips):
        t = titles.get(Path(str(c.audio)).name)
        if t:
            by_title.setdefault(t, []).append(i)
    queries = sorted(by_title)
    temb = pipe.embed_text(queries)
    sims = temb @ emb.T
    ranks = []
    for q, row in zip(queries, sims):
        order = np.argsort(-row, kind="stable")
        pos = np.where(np.isin(order, by_title[q]))[0]
        ranks.append(int(pos[0]))
    ranks_a = np.array(ranks)
    res["t2a_titles_R@1"] = float((ranks_a < 1).mean())
    res["t2a_titles_R@10"] = float((ranks_a < 10).mean())
    res["t2a_titles_n_queries"] = len(queries)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the config's train.max_steps)")
    ap.add_argument("--config", default=str(REPO / "configs" / "sfx.yaml"))
    ap.add_argument("--out", default=str(REPO / "runs" / "esc50_dev"))
    ap.add_argument("--esc50", default=str(ESC), help="ESC-50-format folder (audio/, meta/esc50.csv)")
    ap.add_argument("--train-soundscapes", type=int, default=600)
    ap.add_argument("--calib-soundscapes", type=int, default=100)
    ap.add_argument("--val-soundscapes", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--unseen-seed", type=int, default=0)
    ap.add_argument("--skip-unseen", action="store_true")
    ap.add_argument("--no-titles", action="store_true", help="do not add the fold 1-3 Freesound titles as captions")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the runs' existing final checkpoints (train those that have none)")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()

    load_start = _load()
    esc = Path(args.esc50)
    if not (esc / "meta" / "esc50.csv").exists():
        print(json.dumps({"error": f"ESC-50 data not found at {esc}"}))
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import numpy as np

    from finelap.cli import main as cli
    from finelap.config import load_run_config
    from finelap.data.manifests import read_esc50_csv, read_manifest, write_manifest
    from finelap.data.types import Clip

    t_all = time.time()
    scapes_dir = out / "soundscapes"
    # calib mixes the training folds' sources anew (its own seed): a recording may be in one split per synth call
    synth(cli, esc, scapes_dir, {"train": (args.train_soundscapes, "1,2,3")}, 0, args.workers)
    synth(cli, esc, out / "soundscapes_eval", {"calib": (args.calib_soundscapes, "1,2,3"), "val": (args.val_soundscapes, "4")}, 1, args.workers)
    synth_s = time.time() - t_all

    titles = {} if args.no_titles else read_titles(esc)
    clips = read_esc50_csv(esc / "meta" / "esc50.csv", esc / "audio")
    classes = sorted({c.labels[0] for c in clips})
    cfg = load_run_config(Path(args.config), args.overrides)
    template = cfg.data.caption_template if "{}" in cfg.data.caption_template else "{}"

    def with_titles(cs: list) -> list:
        import dataclasses

        out_cs = []
        for c in cs:
            t = titles.get(Path(str(c.audio)).name)
            caps = [template.format(c.labels[0].replace("_", " "))] + ([t] if t else [])
            out_cs.append(dataclasses.replace(c, captions=caps) if t else c)
        return out_cs

    train_clips = [c for c in clips if int(c.meta["fold"]) in (1, 2, 3)]
    val_clips = [c for c in clips if int(c.meta["fold"]) == 4]
    write_manifest(out / "esc_train.jsonl", with_titles(train_clips))
    write_manifest(out / "esc_val.jsonl", val_clips)
    scapes_train = scapes_dir / "train" / "manifest.jsonl"
    calib = out / "soundscapes_eval" / "calib" / "manifest.jsonl"
    scapes_val = read_manifest(out / "soundscapes_eval" / "val" / "manifest.jsonl")
    steps = args.steps or cfg.train.max_steps
    result: dict[str, Any] = {"benchmark": "esc50_dev", "config": str(args.config), "steps": steps, "load_avg_start": load_start}

    # ------------------------------------------------------------------ run 1: all 40 classes
    run_dir = out / "run_all40"
    if args.eval_only and (run_dir / "final").exists():
        final, info = run_dir / "final", {}
    else:
        final, info = train_run("all40", Path(args.config), [scapes_train, out / "esc_train.jsonl"], calib, steps, out, args.overrides)
    t_eval = time.time()
    ev = evaluate(final, val_clips, scapes_val, classes, read_titles(esc), scapes_dir / "phrase_bank.json")
    result.update(all40_train=info, all40_eval_seconds=round(time.time() - t_eval, 1))
    result["zeroshot_top1_fold4"] = ev["zeroshot_top1_fold4"]
    result["zeroshot_top5_fold4"] = ev["zeroshot_top5_fold4"]
    result["psds1_fold4_soundscapes"] = ev["sed"].get("PSDS1")
    result["sed_fold4"] = ev["sed"]
    result["grounding_frame_auroc_fold4"] = ev["grounding"].get("grounding_frame_AUROC")
    result["grounding_fold4"] = ev["grounding"]
    result["t2a_titles_R@1"] = ev["t2a_titles_R@1"]
    result["t2a_titles_R@10"] = ev["t2a_titles_R@10"]
    result["t2a_titles_n_queries"] = ev["t2a_titles_n_queries"]
    result["checkpoint"] = str(final)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")  # run 1's numbers survive an interrupted run 2

    # ------------------------------------------------------------------ run 2: 10 classes unseen
    if not args.skip_unseen:
        rng = np.random.default_rng(args.unseen_seed)
        unseen = sorted(str(x) for x in rng.choice(classes, size=10, replace=False))
        hide = set(unseen)
        tr = [c for c in train_clips if c.labels[0] not in hide]
        write_manifest(out / "esc_train_seen30.jsonl", with_titles(tr))
        kept_scapes = [c for c in read_manifest(scapes_train) if not ({e.label for e in c.events} & hide)]
        write_manifest(out / "soundscapes_seen30.jsonl", kept_scapes)
        kept_calib = [c for c in read_manifest(calib) if not ({e.label for e in c.events} & hide)]
        write_manifest(out / "calib_seen30.jsonl", kept_calib)
        run2 = out / "run_unseen10"
        if args.eval_only and (run2 / "final").exists():
            final2, info2 = run2 / "final", {}
        else:
            final2, info2 = train_run("unseen10", Path(args.config), [out / "soundscapes_seen30.jsonl", out / "esc_train_seen30.jsonl"],
                                      out / "calib_seen30.jsonl", steps, out, args.overrides)
        from finelap.eval.tasks import evaluate_zeroshot
        from finelap.infer import Pipeline

        fns = Pipeline.from_pretrained(final2).evaluatable(name="unseen10")
        zs10 = evaluate_zeroshot(fns, [c for c in val_clips if c.labels[0] in hide], labels=unseen)
        result.update(unseen10_top1_fold4=zs10["top1_accuracy"], unseen10_classes=unseen, unseen10_train=info2,
                      unseen10_n_train_soundscapes=len(kept_scapes), unseen10_checkpoint=str(final2))
    result["synth_seconds"] = round(synth_s, 1)
    result["wall_seconds"] = round(time.time() - t_all, 1)
    result["load_avg"] = _load()
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
