"""Sound event detection: when does each label happen in each file?

Examples:
  finelap detect street.wav --labels "dog;car horn;siren" --out street.tsv --plot street.png --checkpoint CKPT
  finelap detect recordings/*.flac --labels @labels.txt --out events.tsv --scores-out scores/ --checkpoint CKPT

--out writes DCASE TSV (filename, onset, offset, event_label); without it the events are printed
with their confidence. --scores-out writes sed_scores_eval score TSVs (onset, offset, one column
per label) per file, for threshold-free evaluation (PSDS). Audio of any length is streamed.
Post-processing is in seconds; defaults come from the checkpoint (eval section).
"""
from __future__ import annotations

import argparse

from ._pipeline import add_model_arguments, add_post_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files (any length)")
    p.add_argument("--labels", required=True, help="';'-separated labels, or @FILE with one label per line")
    p.add_argument("--out", default=None, metavar="TSV", help="write detections as DCASE TSV (default: print them)")
    p.add_argument("--scores-out", default=None, metavar="PATH",
                   help="per-file score TSVs (onset offset <label...>): a directory, or a .tsv file for one input")  # fmt: skip
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="spectrogram + per-label curves + detections (several inputs: PNG stem _<file>.png)")  # fmt: skip
    p.add_argument("--template", default=None, help="prompt template with {} for the label (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print the detections as JSON")
    add_post_arguments(p)
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    import csv
    import io
    import json
    from pathlib import Path

    from ..utils import atomic_path, log, write_text_atomic
    from ._pipeline import calibrated, check_audio_files, fmt_prob, fmt_table, load_pipeline, per_file_path, post_kwargs, read_labels

    labels = read_labels(args.labels)
    files = check_audio_files(args.audio)
    names = [f.name for f in files]
    if len(set(names)) != len(names):  # DCASE rows and score files are keyed by the base name
        from ..errors import FinelapError

        dup = next(n for n in names if names.count(n) > 1)
        raise FinelapError(f"two inputs share the file name {dup!r}; DCASE output is keyed by file name")
    pipe = load_pipeline(args)
    template = pipe.prompt_template if args.template is None else args.template
    post = post_kwargs(args)
    pipe.resolve_postprocessing(**post)  # validate before any audio is decoded
    multiple = len(files) > 1
    rows = []
    peak = (-1.0, "")  # the highest probability seen, to say what to change when nothing is found
    for f in files:
        fs = pipe.frame_scores(str(f), labels, calibrated=calibrated(args), template=template)
        p, j, k = fs.peak()
        if p > peak[0]:
            peak = (p, f"{labels[k]!r} in {f.name} at {fs.times[j]:.2f} s")
        segs = pipe.segments_from_scores(fs, **post)
        rows += [{"filename": f.name, "onset": round(on, 3), "offset": round(off, 3), "event_label": lab, "confidence": c}
                 for on, off, lab, c in segs]  # fmt: skip
        if args.scores_out:
            sp = Path(args.scores_out)
            target = sp if (not multiple and sp.suffix.lower() == ".tsv") else sp / f"{f.stem}.tsv"
            with atomic_path(target) as tmp:
                fs.to_dataframe(labels).to_csv(tmp, sep="\t", index=False)
        if args.plot:
            per_label = [[(on, off) for on, off, lab, _ in segs if lab == name] for name in labels]
            thr = pipe.resolve_postprocessing(**post)[0]
            png = pipe.plot(str(f), fs, per_file_path(args.plot, f, multiple, ".png"), segments=per_label, threshold=thr,
                            title=f"{f.name}: detection (template {template!r})")  # fmt: skip
            log(f"plot: {png}")
    if args.out:
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t", lineterminator="\n")
        w.writerow(["filename", "onset", "offset", "event_label"])
        for r in rows:
            w.writerow([r["filename"], f"{r['onset']:.3f}", f"{r['offset']:.3f}", r["event_label"]])
        write_text_atomic(args.out, buf.getvalue())
        log(f"{len(rows)} events in {len(files)} file(s) -> {args.out}")
    if args.json:
        print(json.dumps({"template": template, "events": rows}, indent=2))
    elif not args.out:
        if rows:
            print(fmt_table([(r["filename"], f"{r['onset']:.3f}", f"{r['offset']:.3f}", r["event_label"], fmt_prob(r["confidence"])) for r in rows],
                            ("filename", "onset", "offset", "event_label", "confidence"), indent=""))  # fmt: skip
        else:
            from ..scoring import suggest_threshold

            print(f"no events above threshold {pipe.resolve_postprocessing(**post)[0]:g} in {len(files)} file(s); "
                  f"the highest probability was {fmt_prob(peak[0])} ({peak[1]}): try --threshold {suggest_threshold(peak[0]):g}")  # fmt: skip
    if args.scores_out:
        log(f"scores: {args.scores_out}")
    return 0
