"""Describe audio files in words with the caption decoder of a SLAP-trained checkpoint.

Examples:
  finelap caption a.wav b.flac --checkpoint runs/slap/final
  finelap caption a.wav --checkpoint CKPT --beam 1 --max-len 20 --json

Each file is encoded whole (no cropping, at the model's sample rate) and decoded greedily
(--beam 1) or with beam search ranked by length-normalised log-probability. Only checkpoints
trained with a caption decoder (loss.caption, preset slap) can caption. Output: one
"FILE<TAB>caption" line per file, or JSON with --json.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files (wav, flac, ogg, ...)")
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

    from ..train.checkpoint import CONFIG_FILE, MODEL_FILE, _resolve_dir

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

    from ..audio import load_audio
    from ..errors import CheckpointError, ConfigError
    from ..models.build import load_pretrained
    from ..utils import log
    from ._pipeline import check_audio_files

    if args.beam < 1:
        raise ConfigError(f"--beam must be >= 1, got {args.beam}")
    if args.max_len < 1:
        raise ConfigError(f"--max-len must be >= 1, got {args.max_len}")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    files = check_audio_files(args.audio)  # every input is checked before the model loads
    if has_caption_decoder(args.checkpoint) is False:  # a user error that needs no model: say it at once
        raise CheckpointError(f"{args.checkpoint}: this checkpoint was not trained with a caption decoder (preset slap)")
    # The lead's `models.build.load_pretrained` does not attach SLAP modules (yet); this loader
    # builds the model, attaches the caption decoder from the stored weights, then loads them.
    model, run_cfg, ckpt = load_pretrained(args.checkpoint, use_ema=not args.no_ema, map_location=args.device)
    decoder = getattr(model, "caption_decoder", None)
    if decoder is None:
        raise CheckpointError(f"{ckpt.path}: this checkpoint was not trained with a caption decoder (preset slap)")
    if args.max_len > decoder.max_len:
        raise ConfigError(f"--max-len {args.max_len} exceeds the decoder's maximum of {decoder.max_len} tokens")
    tokenizer = model.text.tokenizer
    sr = model.sample_rate
    results = []
    for f in files:
        wave = torch.from_numpy(load_audio(f, sr)).to(args.device)
        seconds = wave.shape[0] / sr
        if seconds > run_cfg.audio.max_seconds:
            log(f"note: {f} is {seconds:.0f} s long, beyond the {run_cfg.audio.max_seconds:.0f} s clips the decoder was trained on")
        with torch.no_grad():
            out = model.audio(wave[None])  # raw encoder frames: what the decoder was trained on
            ids = decoder.generate(out.frames, out.frame_mask, max_len=args.max_len, beam_size=args.beam)[0]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        results.append({"file": str(f), "caption": text, "tokens": ids})
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt.path), "beam": args.beam, "results": results}, indent=2))
    else:
        for r in results:
            print(f"{r['file']}\t{r['caption']}")
    return 0
