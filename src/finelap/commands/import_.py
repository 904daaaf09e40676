"""Turn a published checkpoint you downloaded into a finelap checkpoint directory.

Examples:
  finelap import laion-clap 630k-audioset-best.pt --text-model ~/models/roberta-base --out ckpt/laion-clap
  finelap import laion-clap ~/models/clap-htsat-unfused --out ckpt/laion-clap-hf
  finelap import flam open_flam_oct17.pth --text-model ~/models/roberta-base --out ckpt/openflam
  finelap import finelap finelap_fixed.pt --text-model ~/models/roberta-base --out ckpt/finelap
  finelap import mgaclap model.pt --text-model ~/models/bert-base-uncased --out ckpt/mgaclap

The result is a normal checkpoint (model.safetensors + config.json with the original front-end,
frame rate, prompt template and logit scale; the text tower's config and tokenizer in text/), so
classify, detect, ground, search, eval and HEAR work on it. Nothing is downloaded: give local
paths. Pickled sources are read with torch.load(weights_only=True). See docs/published-models.md.
"""
from __future__ import annotations

import argparse

KINDS = ("laion-clap", "flam", "finelap")
KINDS += ("mgaclap",)  # MGA-CLAP (finelap.models.published_mga)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=KINDS, help="which release SRC is")
    p.add_argument("src", metavar="SRC", help="the downloaded checkpoint file (or Hugging Face model folder)")
    p.add_argument("--text-model", default=None, metavar="DIR",
                   help="local folder of the text tower the release was trained with (roberta-base / bert-base-uncased): "
                        "its config and tokenizer are copied into the checkpoint")  # fmt: skip
    p.add_argument("--out", required=True, metavar="CKPT_DIR", help="checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")


def run(args: argparse.Namespace) -> int:
    from ..models.published import import_checkpoint

    out = import_checkpoint(args.kind, args.src, args.text_model, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (from {args.kind} {args.src})")
    return 0
