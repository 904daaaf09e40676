"""Describe audio files in words with the caption decoder of a SLAP-trained checkpoint.

Examples:
  finelap caption a.wav b.flac --checkpoint runs/slap/final
  finelap caption a.wav --checkpoint CKPT --beam 1 --max-len 20 --json

Each file is encoded whole (no cropping, at the model's sample rate; long files window by window
with bounded memory, the decoder reading all frames) and decoded greedily
(--beam 1) or with beam search ranked by length-normalised log-probability. Only checkpoints
trained with a caption decoder (loss.caption, preset slap) can caption. Output: one
"FILE<TAB>caption" line per file, or JSON with --json.

A folder stands for the audio files under it (recursively, sorted, hidden entries skipped).
Several inputs: a file that cannot be used is skipped and named on stderr ("skipped FILE:
problem"), the others are processed; the exit status is then 1 (0: all processed, 2: none).
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files (wav, flac, ogg, ...) and/or folders (searched recursively)")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="checkpoint directory (or a run directory: its latest checkpoint)")  # fmt: skip
    p.add_argument("--beam", type=int, default=3, metavar="K", help="beam size; 1 = greedy decoding")
    p.add_argument("--max-len", type=int, default=30, metavar="N", help="most word pieces per caption")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the checkpoint has EMA weights")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's choice)")


def has_caption_decoder(checkpoint: str) -> bool | None:
    """Whether a checkpoint has a caption decoder, from its config.json and the names in its
    weight file's header (no tensor is read): True, False, or None when it cannot tell (the
    loader then reports what is wrong with the checkpoint)."""
    import json
    from pathlib import Path

    from ..checkpoint import CONFIG_FILE, MODEL_FILE, _resolve_dir

    try:
        path = _resolve_dir(Path(checkpoint))
        meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        loss = (meta.get("config") or {}).get("loss") or {}
        if isinstance(loss, dict) and loss.get("caption"):
            return True
        from safetensors import safe_open

        with safe_open(str(path / MODEL_FILE), framework="pt") as f:
            return any(k.startswith("caption_decoder.") for k in f.keys())
    except Exception:  # missing / corrupt / not a checkpoint: the loader's error says which
        return None


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from ..errors import AudioError, CheckpointError, ConfigError
    from ..infer import Pipeline
    from ..utils import log
    from ._failures import FileFailures, expand_inputs

    if args.beam < 1:
        raise ConfigError(f"--beam must be >= 1, got {args.beam}")
    if args.max_len < 1:
        raise ConfigError(f"--max-len must be >= 1, got {args.max_len}")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    inputs = expand_inputs(args.audio)  # a folder stands for the audio files under it
    failures = FileFailures("caption", len(inputs))
    files = failures.readable(inputs)  # every input is checked before the model loads
    if has_caption_decoder(args.checkpoint) is False:  # a user error that needs no model: say it at once
        raise CheckpointError(f"{args.checkpoint}: this checkpoint was not trained with a caption decoder (preset slap)")
    pipe = Pipeline.from_pretrained(args.checkpoint, device=args.device, use_ema=not args.no_ema)
    if not pipe.can_caption:
        raise CheckpointError(f"{pipe.checkpoint.path}: this checkpoint was not trained with a caption decoder (preset slap)")
    decoder = pipe.model.caption_decoder
    if args.max_len > decoder.max_len:
        raise ConfigError(f"--max-len {args.max_len} exceeds the decoder's maximum of {decoder.max_len} tokens")
    max_s = pipe.config.audio.max_seconds
    results = []
    for f in files:
        try:
            # streamed: the encoder runs window by window, the decoder reads all frames
            r = pipe.caption(str(f), max_len=args.max_len, beam_size=args.beam)
        except AudioError as e:  # e.g. NaN samples or corrupt data past the header: skip, report, go on
            failures.add(f, e)
            continue
        if r["duration_s"] > max_s:
            log(f"note: {f} is {r['duration_s']:.0f} s long, beyond the {max_s:.0f} s clips the decoder was trained on")
        results.append({"file": str(f), "caption": r["caption"], "tokens": r["tokens"]})
    if args.json:
        print(json.dumps({"checkpoint": str(pipe.checkpoint.path), "beam": args.beam, "results": results,
                          "failed": failures.as_json()}, indent=2))  # fmt: skip
    else:
        for r in results:
            print(f"{r['file']}\t{r['caption']}")
    return failures.exit_status(len(results))
