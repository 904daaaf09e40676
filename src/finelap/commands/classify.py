"""Zero-shot classification of audio files against your own labels.

Examples:
  finelap classify a.wav b.wav --labels "dog;rain;siren" --checkpoint runs/finelap/final
  finelap classify a.wav --labels 'dog barking, "rain, heavy", siren' --checkpoint CKPT
  finelap classify clips/*.flac --labels @labels.txt --top-k 3 --json --checkpoint CKPT

--labels: separated by ';' or ','; double quotes keep a separator inside a label; @FILE reads
one label per line. The number of labels parsed is printed on stderr.

Each label becomes a prompt through the checkpoint's prompt template (e.g. "the sound of {}"),
unless --template is given. Probabilities are a softmax over the labels (they sum to 1), or
independent per-label sigmoids with --multi-label.

A folder stands for the audio files under it (recursively, sorted, hidden entries skipped).
Several inputs: a file that cannot be used is skipped and named on stderr ("skipped FILE:
problem"), the others are processed; the exit status is then 1 (0: all processed, 2: none).
"""
from __future__ import annotations

import argparse

from ._pipeline import LABELS_HELP, add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files (wav, flac, ogg, ...) and/or folders (searched recursively)")
    p.add_argument("--labels", required=True, help=LABELS_HELP)
    p.add_argument("-k", "--top-k", type=int, default=5, help="labels shown per file")
    p.add_argument("--template", default=None, help="prompt template with {} for the label (default: the checkpoint's)")
    p.add_argument("--multi-label", action="store_true", help="independent sigmoid probabilities instead of a softmax")
    p.add_argument("--batch-size", type=int, default=16, help="files encoded together")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    import json

    from ..errors import AudioError, ConfigError
    from ._failures import FileFailures, expand_inputs
    from ._pipeline import fmt_prob, fmt_table, load_pipeline, log_labels, read_labels

    labels = read_labels(args.labels)
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    inputs = expand_inputs(args.audio)  # a folder stands for the audio files under it
    failures = FileFailures("classify", len(inputs))
    files = failures.readable(inputs)  # unreadable files are reported before the model loads
    pipe = load_pipeline(args)
    log_labels(labels)  # after the checks and the load, so a user error stays the only line
    template = pipe.prompt_template if args.template is None else args.template

    def classify(group):
        return pipe.classify([str(f) for f in group], labels, template=template, top_k=args.top_k,
                             multi_label=args.multi_label, batch_size=args.batch_size)  # fmt: skip

    done: list = []  # (file, predictions [{"label", "score"}])
    chunk = max(4 * args.batch_size, 16)  # files decoded together (bounded memory)
    for g in range(0, len(files), chunk):
        group = files[g : g + chunk]
        try:
            done += list(zip(group, classify(group)))
        except AudioError:  # a file that only fails when decoded: isolate it, keep the others
            for f in group:
                try:
                    done += list(zip([f], classify([f])))
                except AudioError as e:
                    failures.add(f, e)
    if args.json:
        out = [{"file": str(f), "predictions": preds} for f, preds in done]
        print(json.dumps({"template": template, "multi_label": args.multi_label, "results": out,
                          "failed": failures.as_json()}, indent=2))  # fmt: skip
        return failures.exit_status(len(done))
    kind = "sigmoid, multi-label" if args.multi_label else f"softmax over {len(labels)} labels"
    print(f"prompt template: {template!r} ({kind})")
    for f, preds in done:
        print(f"\n{f}")
        print(fmt_table([(i + 1, r["label"], fmt_prob(r["score"])) for i, r in enumerate(preds)], ("rank", "label", "score")))
    return failures.exit_status(len(done))
