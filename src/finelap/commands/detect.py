"""Sound event detection: when does each label happen in each file?

Examples:
  finelap detect street.wav --labels "dog;car horn;siren" --out street.tsv --plot street.png --checkpoint CKPT
  finelap detect recordings/*.flac --labels @labels.txt --out events.tsv --scores-out scores/ --checkpoint CKPT
  finelap detect test_000000.flac --labels "a violin playing,a dog barking" --plot det.png \
                 --reference test/strong.tsv --log-scale --threshold 0.2 --median-filter 0.5 --checkpoint CKPT

--labels: separated by ';' or ','; double quotes keep a separator inside a label; @FILE reads
one label per line. --out writes DCASE TSV (filename, onset, offset, event_label); without it
the events are printed with their score (the highest probability inside the event). --plot
draws the spectrogram, one probability curve per label, the threshold and the detections;
--reference adds the reference events of that file from a DCASE strong-label TSV.
--scores-out writes sed_scores_eval score TSVs (onset, offset, one column per label) per file,
for threshold-free evaluation (PSDS). Audio of any length is streamed. Post-processing is in
seconds; defaults come from the checkpoint (eval section).

A folder stands for the audio files under it (recursively, sorted, hidden entries skipped).
Several inputs: a file that cannot be used is skipped and named on stderr ("skipped FILE:
problem"), the others are processed; the exit status is then 1 (0: all processed, 2: none).
"""
from __future__ import annotations

import argparse

from ._pipeline import LABELS_HELP, add_model_arguments, add_plot_arguments, add_post_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files (any length) and/or folders (searched recursively)")
    p.add_argument("--labels", required=True, help=LABELS_HELP)
    p.add_argument("--out", default=None, metavar="TSV", help="write detections as DCASE TSV (default: print them)")
    p.add_argument("--scores-out", default=None, metavar="PATH",
                   help="per-file score TSVs (onset offset <label...>): a directory, or a .tsv file for one input")  # fmt: skip
    add_plot_arguments(p, "detections (several inputs: one PNG each, named <PNG stem>_<file>.png)")
    p.add_argument("--template", default=None, help="prompt template with {} for the label (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print the detections as JSON")
    add_post_arguments(p)
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    import csv
    import io
    import json
    from pathlib import Path

    from ..errors import AudioError
    from ..utils import atomic_path, log, write_text_atomic
    from ._failures import FileFailures, expand_inputs
    from ._pipeline import (calibrated, check_post_arguments, fmt_prob, fmt_table, load_pipeline, log_labels, per_file_path,
                            post_kwargs, read_labels, read_reference, reference_segments)  # fmt: skip

    labels = read_labels(args.labels)
    reference = read_reference(args.reference)
    check_post_arguments(args)
    inputs = expand_inputs(args.audio)  # a folder stands for the audio files under it
    failures = FileFailures("detect", len(inputs))
    files = failures.readable(inputs)  # unreadable files are reported before the model loads
    names = [f.name for f in files]
    if len(set(names)) != len(names):  # DCASE rows and score files are keyed by the base name
        from ..errors import FinelapError

        dup = next(n for n in names if names.count(n) > 1)
        raise FinelapError(f"two inputs share the file name {dup!r}; DCASE output is keyed by file name")
    pipe = load_pipeline(args)
    log_labels(labels)  # after the checks and the load, so a user error stays the only line
    template = pipe.prompt_template if args.template is None else args.template
    post = post_kwargs(args)
    pipe.resolve_postprocessing(**post)  # validate before any audio is decoded
    used = pipe.detection_settings(labels, **post, announce=False)  # each label's own threshold, or the global one
    thresholds = [used.threshold_for(lab) for lab in labels]
    # output names do not change when some inputs fail, nor when a folder happens to hold one file
    multiple = len(inputs) > 1 or any(Path(a).is_dir() for a in args.audio)
    rows = []
    peak = (-1.0, "", labels[0])  # the highest probability seen, to say what to change when nothing is found
    n_done = 0
    for f in files:
        try:
            fs = pipe.frame_scores(str(f), labels, calibrated=calibrated(args), template=template)
        except AudioError as e:  # e.g. NaN samples or corrupt data past the header: skip, report, go on
            failures.add(f, e)
            continue
        n_done += 1
        p, j, k = fs.peak()
        if p > peak[0]:
            peak = (p, f"{labels[k]!r} in {f.name} at {fs.times[j]:.2f} s", labels[k])
        segs = pipe.segments_from_scores(fs, **post)
        rows += [{"filename": f.name, "onset": round(on, 3), "offset": round(off, 3), "score": c, "label": lab}
                 for on, off, lab, c in segs]  # fmt: skip
        if args.scores_out:
            sp = Path(args.scores_out)
            target = sp if (not multiple and sp.suffix.lower() == ".tsv") else sp / f"{f.stem}.tsv"
            with atomic_path(target) as tmp:
                fs.to_dataframe(labels).to_csv(tmp, sep="\t", index=False)
        if args.plot:
            per_label = [[(on, off) for on, off, lab, _ in segs if lab == name] for name in labels]
            png = pipe.plot(str(f), fs, per_file_path(args.plot, f, multiple, ".png"), segments=per_label,
                            threshold=[v for v, _ in thresholds], threshold_kinds=[k for _, k in thresholds], title=f"{f.name}: detection (template {template!r})", log_scale=args.log_scale,
                            reference=reference_segments(reference, f, labels, args.reference))  # fmt: skip
            log(f"plot: {png}")
    if args.out:
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t", lineterminator="\n")
        w.writerow(["filename", "onset", "offset", "event_label"])
        for r in rows:
            w.writerow([r["filename"], f"{r['onset']:.3f}", f"{r['offset']:.3f}", r["label"]])
        if n_done:  # nothing to write when every file failed (exit 2 below)
            write_text_atomic(args.out, buf.getvalue())
            log(f"{len(rows)} events in {n_done} file(s) -> {args.out}")
    if args.json:
        print(json.dumps({"template": template, "events": rows, "failed": failures.as_json()}, indent=2))
    elif not args.out:
        if rows:
            print(fmt_table([(r["filename"], f"{r['onset']:.3f}", f"{r['offset']:.3f}", r["label"], fmt_prob(r["score"])) for r in rows],
                            ("filename", "onset", "offset", "label", "score"), indent=""))  # fmt: skip
        elif n_done:  # (none done: exit 2 below, the skipped files are listed)
            from ..scoring import nothing_found_advice

            print(f"no events above the threshold in {n_done} file(s); the highest probability was {fmt_prob(peak[0])} "
                  f"({peak[1]}), {nothing_found_advice(peak[0], used, peak[2])}")  # fmt: skip
    if args.scores_out and n_done:
        log(f"scores: {args.scores_out}")
    return failures.exit_status(n_done)
