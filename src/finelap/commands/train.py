"""Train a model from a YAML config (or preset name) plus dotted overrides.

Examples:
  finelap train --config configs/finelap.yaml data.train=[train/manifest.jsonl] data.val=[val/manifest.jsonl]
  finelap train --config finelap train.max_minutes=10 train.out_dir=runs/demo
  finelap train --config configs/finelap.yaml --resume            # continue runs/finelap from its latest checkpoint
  torchrun --nproc_per_node 2 .venv/bin/finelap train --config finelap ...   # DDP (gloo on CPU)
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML file or preset name (clap, finelap, flam, mgaclap, slap)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.max_steps=100 loss.weights.frame=2.0")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                   help="resume from DIR (a checkpoint or run directory); without DIR: the run's latest checkpoint")
    p.add_argument("--out", default=None, help="run directory (same as train.out_dir=...)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from ..config import load_run_config, to_dict

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    cfg = load_run_config(args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from ..train.loop import train

    train(cfg, resume=args.resume)
    return 0
