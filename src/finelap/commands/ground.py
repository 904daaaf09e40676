"""Find where a phrase happens in an audio file (text-to-audio grounding).

Examples:
  finelap ground park.wav "a dog barking" --checkpoint CKPT
  finelap ground park.wav "a dog barking" "children laughing" --plot park.png --json --checkpoint CKPT
  finelap ground test_000000.flac "a violin playing" --plot g.png --reference test/strong.tsv --log-scale --checkpoint CKPT

Prints the segments (seconds) whose frame probability exceeds the threshold, with their score
(the highest probability inside the segment). A phrase becomes a prompt as a detect label does
(the checkpoint's template, underscores as spaces), so grounding a phrase equals detecting it;
thresholds and filters come from the checkpoint's calibration when it has one. Audio of any
length is streamed. --plot draws the spectrogram, one probability curve per phrase, the threshold
and the segments found; --reference adds the events of this file from a DCASE strong-label TSV
whose label is one of the phrases.
"""
from __future__ import annotations

import argparse

from ._pipeline import add_model_arguments, add_plot_arguments, add_post_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audio", metavar="AUDIO", help="audio file (any length)")
    p.add_argument("text", nargs="+", metavar="TEXT", help="phrase(s) to find, e.g. \"a dog barking\"")
    add_plot_arguments(p, "segments found")
    p.add_argument("--template", default=None, help="prompt template with {} for the phrase (default: the checkpoint's, as detect)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_post_arguments(p)
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from ..errors import FinelapError
    from ..scoring import fmt_threshold
    from ..utils import log
    from ._pipeline import calibrated, check_audio_files, check_post_arguments, fmt_prob, fmt_table, load_pipeline, post_kwargs, read_reference, reference_segments

    texts = [t.strip() for t in args.text]
    if any(not t for t in texts):
        raise FinelapError("empty text query: give a phrase such as \"a dog barking\"")
    (path,) = check_audio_files([args.audio])  # every user error is reported before the model loads
    reference = read_reference(args.reference)
    check_post_arguments(args)
    pipe = load_pipeline(args)
    post = post_kwargs(args)
    thr = pipe.resolve_postprocessing(**post)[0]
    fs = pipe.frame_scores(str(path), texts, calibrated=calibrated(args), template=args.template)
    segs = pipe.segments_from_scores(fs, **post)
    per_text = [[(on, off, c) for on, off, lab, c in segs if lab == t] for t in texts]
    used = pipe.detection_settings(texts, **post, announce=False)  # each query's own threshold, or the global one
    thresholds = [used.threshold_for(t) for t in texts]
    if args.plot:
        png = pipe.plot(str(path), fs, args.plot, segments=[[(a, b) for a, b, _ in s] for s in per_text],
                        threshold=[v for v, _ in thresholds], threshold_kinds=[k for _, k in thresholds],
                        title=f"{path.name}: grounding", log_scale=args.log_scale,
                        reference=reference_segments(reference, path, texts, args.reference))  # fmt: skip
        log(f"plot: {png}")
    if args.json:
        out = [{"text": t, "threshold": v, "threshold_kind": kind,
                "segments": [{"onset": round(a, 3), "offset": round(b, 3), "score": c, "label": t} for a, b, c in s]}
               for t, s, (v, kind) in zip(texts, per_text, thresholds)]  # fmt: skip
        print(json.dumps({"file": str(path), "duration": round(fs.duration_s, 3), "threshold": thr,
                          "calibrated": fs.calibrated, "queries": out}, indent=2))  # fmt: skip
        return 0
    kinds = {kind for _, kind in thresholds}
    print(f"{path} ({fs.duration_s:.2f} s), threshold {fmt_threshold(thr)}"
          + (" (global; some queries have their own)" if "per-class" in kinds else ""))  # fmt: skip
    for k, (t, s) in enumerate(zip(texts, per_text)):
        print(f"\n\"{t}\"")
        if s:
            print(fmt_table([(f"{a:.3f}", f"{b:.3f}", fmt_prob(c)) for a, b, c in s], ("onset", "offset", "score")))
        else:
            j = int(np.argmax(fs.scores[:, k]))
            from ..scoring import nothing_found_advice

            top = float(fs.scores[j, k])
            print(f"  no segment: the highest probability was {fmt_prob(top)} at {fs.times[j]:.2f} s, "
                  f"{nothing_found_advice(top, used, t)}")  # fmt: skip
    return 0
