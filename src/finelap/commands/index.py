"""Build or update a search index over a folder of audio (recursively).

Re-running embeds only new or changed files and drops deleted ones. Unreadable files are skipped,
listed in the index and retried next time.

Example:
  finelap index build ~/sounds --checkpoint runs/finelap/final --out sounds.idx --frames
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build", "info"], help="build/update an index, or print what an index holds")
    p.add_argument("path", help="build: the folder to index; info: the index directory")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (build: required)")
    p.add_argument("--out", default=None, help="index directory to create or update (build: required)")
    p.add_argument("--frames", action="store_true", help="also keep frame embeddings, so search returns the best time span")
    p.add_argument("--rebuild", action="store_true", help="start over (needed after changing the checkpoint)")
    p.add_argument("--rehash", action="store_true", help="hash every file instead of trusting size + modification time")
    p.add_argument("--float16", action="store_true", help="store clip embeddings as float16 (half the size)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import json

    from ..errors import FinelapError
    from ..search import Index
    from ..utils import log

    if args.action == "info":
        print(json.dumps(Index.load(args.path).info(), indent=2, default=str))
        return 0
    if not args.checkpoint or not args.out:
        raise FinelapError("index build needs --checkpoint DIR and --out INDEX_DIR")
    from ..infer import Pipeline

    pipe = Pipeline.from_pretrained(args.checkpoint, device=args.device)
    idx = Index.build(args.path, pipe, args.out, with_frames=args.frames, batch_size=args.batch_size,
                      rebuild=args.rebuild, rehash=args.rehash, clip_dtype="float16" if args.float16 else "float32")  # fmt: skip
    log(idx.report.summary())
    print(json.dumps({"index": str(args.out), **idx.report.counts(), "failed": idx.report.failed}, indent=2, default=str))
    return 0
