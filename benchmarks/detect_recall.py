"""Do `detect` and `ground` find the events at a checkpoint's default settings?

For every file of a strong-label manifest (JSONL with events, e.g. the demo's test split), runs
`Pipeline.detect` with all the manifest's event labels and `Pipeline.ground` with each label that
occurs in the file, exactly as `finelap detect` / `finelap ground` do with no flags (the
checkpoint's calibrated post-processing). Counting:

- a reference event is *found* when a detection (or grounded segment) with its label overlaps it
  in time by at least `--min-overlap` of the event's duration (default 0.5);
- precision: the share of detections that overlap by that rule some reference event of their label;
- onset error: |detected onset - reference onset| of the overlapping detection that starts nearest.

Prints one JSON object (the last thing on stdout) with recall/precision for detect and ground.

    python benchmarks/detect_recall.py --checkpoint demo_out/run/final --data demo_out/soundscapes/test/manifest.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def match(refs: list[tuple[float, float]], hyps: list[tuple[float, float]], min_overlap: float) -> tuple[list[int], list[bool], list[float]]:
    """-> (index of the matched hypothesis per reference or -1, per-hypothesis "overlaps a
    reference", onset errors of matched references)."""
    found, errs = [], []
    hyp_ok = [False] * len(hyps)
    for r0, r1 in refs:
        need = min_overlap * max(r1 - r0, 1e-9)
        best, best_err = -1, float("inf")
        for j, (h0, h1) in enumerate(hyps):
            if _overlap(r0, r1, h0, h1) >= need:
                hyp_ok[j] = True
                if abs(h0 - r0) < best_err:
                    best, best_err = j, abs(h0 - r0)
        found.append(best)
        if best >= 0:
            errs.append(best_err)
    return found, hyp_ok, errs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True, help="strong-label JSONL manifest (events with onset/offset/label)")
    ap.add_argument("--min-overlap", type=float, default=0.5, help="share of a reference event a detection must cover")
    ap.add_argument("--max-files", type=int, default=None)
    ap.add_argument("--no-ground", action="store_true")
    args = ap.parse_args()
    import numpy as np

    from finelap.data.manifests import read_manifest
    from finelap.infer import Pipeline

    load = [round(x, 2) for x in os.getloadavg()]
    clips = [c for c in read_manifest(args.data) if c.events is not None][: args.max_files]
    labels = sorted({e.label for c in clips for e in c.events})
    pipe = Pipeline.from_pretrained(args.checkpoint)
    settings = pipe.detection_settings(labels, announce=False).describe()
    t0 = time.time()
    out = {"detect": {"found": 0, "events": 0, "hyps": 0, "hyps_ok": 0, "onset_err": []},
           "ground": {"found": 0, "events": 0, "hyps": 0, "hyps_ok": 0, "onset_err": []}}
    per_label: dict[str, list[int]] = {}
    for c in clips:
        det = pipe.detect(c.audio, labels)
        for lab in sorted({e.label for e in c.events}):
            refs = [(e.onset, e.offset) for e in c.events if e.label == lab]
            hyps = [(d["onset"], d["offset"]) for d in det if d["label"] == lab]
            found, _, errs = match(refs, hyps, args.min_overlap)
            o = out["detect"]
            o["found"] += sum(f >= 0 for f in found)
            o["events"] += len(refs)
            o["onset_err"] += errs
            pl = per_label.setdefault(lab, [0, 0])
            pl[0] += sum(f >= 0 for f in found)
            pl[1] += len(refs)
            if not args.no_ground:
                seg = [(d["onset"], d["offset"]) for d in pipe.ground(c.audio, lab)]
                gfound, gok, gerrs = match(refs, seg, args.min_overlap)
                g = out["ground"]
                g["found"] += sum(f >= 0 for f in gfound)
                g["events"] += len(refs)
                g["hyps"] += len(seg)
                g["hyps_ok"] += sum(gok)
                g["onset_err"] += gerrs
        # precision of detect over all its detections (any label)
        for lab in sorted({d["label"] for d in det}):
            refs = [(e.onset, e.offset) for e in c.events if e.label == lab]
            hyps = [(d["onset"], d["offset"]) for d in det if d["label"] == lab]
            _, ok, _ = match(refs, hyps, args.min_overlap)
            out["detect"]["hyps"] += len(hyps)
            out["detect"]["hyps_ok"] += sum(ok)
    res: dict = {"benchmark": "detect_recall", "checkpoint": args.checkpoint, "data": args.data, "files": len(clips),
                 "labels": len(labels), "min_overlap": args.min_overlap, "settings": settings}
    for k, o in out.items():
        if not o["events"]:
            continue
        res[k] = {
            "recall": round(o["found"] / o["events"], 4), "found": o["found"], "events": o["events"],
            "precision": round(o["hyps_ok"] / o["hyps"], 4) if o["hyps"] else None, "detections": o["hyps"],
            "median_onset_error_s": round(float(np.median(o["onset_err"])), 3) if o["onset_err"] else None,
        }
    res["worst_labels"] = sorted(((round(f / n, 3), lab, n) for lab, (f, n) in per_label.items()))[:8]
    res["wall_seconds"] = round(time.time() - t0, 1)
    res["load_avg"] = load
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
