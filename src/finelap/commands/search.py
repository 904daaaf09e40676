"""Search an index with a text query: files ranked by match, each with its best time span.

Examples:
  finelap search "a door slams" --index sounds.idx --top-k 10
  finelap search "a dog barking" --index sounds.idx --no-spans --json

The checkpoint is the one the index records (--checkpoint to override it). Each hit gives its
rank, cosine score, best time span (indexes built with --frames) and file.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", help="what to look for, in words")
    p.add_argument("--index", required=True, help="index directory made by `finelap index build`")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the one the index was built with)")
    p.add_argument("-k", "--top-k", type=int, default=10, help="files shown")
    p.add_argument("--no-spans", action="store_true", help="rank files only; skip the best-span search")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")


def run(args: argparse.Namespace) -> int:
    import json

    from ..errors import FinelapError
    from ..infer import Pipeline
    from ..search import Index

    if args.top_k < 1:
        raise FinelapError(f"--top-k must be >= 1, got {args.top_k}")
    if not args.query.strip():
        raise FinelapError("empty query: give words such as \"a door slams\"")
    idx = Index.load(args.index)
    ckpt = args.checkpoint or (idx.embedder_info or {}).get("checkpoint")
    if not ckpt:
        raise FinelapError(f"{args.index}: the index does not record its checkpoint; pass --checkpoint")
    # the weights the index was embedded with (EMA or raw), unless another checkpoint is given
    use_ema = True if args.checkpoint else (idx.embedder_info or {}).get("use_ema") is not False
    pipe = Pipeline.from_pretrained(ckpt, device=args.device, use_ema=use_ema)
    hits = idx.search(args.query, k=args.top_k, embedder=pipe, spans=not args.no_spans)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], indent=2, default=str))
        return 0
    print(f'{"rank":>4}  {"score":>6}  {"span (s)":>15}  file')
    for h in hits:
        span = f"{h.span[0]:7.2f}-{h.span[1]:<7.2f}" if h.span else " " * 15
        print(f"{h.rank:>4}  {h.score:6.3f}  {span}  {h.rel_path or h.path}")
    return 0
