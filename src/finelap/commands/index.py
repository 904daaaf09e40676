"""Build, update or inspect a search index over a folder of audio (searched recursively).

Examples:
  finelap index build ~/sounds --out sounds.idx --checkpoint runs/finelap/final --frames
  finelap index update sounds.idx            # re-scan the folder it indexes, with the checkpoint it records
  finelap index info sounds.idx

`build` embeds every audio file under FOLDER into the index directory --out; run again over an
existing index it updates it. `update` does the same for an existing index without repeating
anything: the folder, the checkpoint (and EMA choice), frames and storage type are the ones the
index records. Either way only new or changed files are embedded and deleted ones are dropped;
unreadable files are skipped, listed in the index and retried next time. A different checkpoint
needs --rebuild (every file is re-embedded). `info` prints what an index holds (JSON).

As in the other multi-file commands, each file that fails is named on stderr with its reason
(`finelap index: skipped FILE: problem`) and the exit status says how it went: 0 every file is
indexed, 1 some failed (the index holds the others), 2 a user error or no file could be indexed.
"""
from __future__ import annotations

import argparse

from ._pipeline import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build", "update", "info"],
                   help="build: index FOLDER into --out; update: refresh the index INDEX; info: print what INDEX holds")  # fmt: skip
    p.add_argument("path", metavar="FOLDER|INDEX", help="build: the folder to index; update, info: the index directory")
    p.add_argument("--out", default=None, metavar="INDEX", help="build: the index directory to create or update")
    p.add_argument("--frames", action="store_true", help="build: also keep frame embeddings, so search returns the best time span")
    p.add_argument("--rebuild", action="store_true", help="start over, re-embedding every file (needed after changing the checkpoint)")
    p.add_argument("--rehash", action="store_true", help="hash every file instead of trusting size + modification time")
    p.add_argument("--float16", action="store_true", help="build: store clip embeddings as float16 (half the size)")
    p.add_argument("--batch-size", type=int, default=16, help="files encoded together")
    add_model_arguments(p, required=False,
                        checkpoint_help="checkpoint directory (build of a new index: required; update: the one the index records)")  # fmt: skip


def _recorded(index_dir: str) -> tuple[object, dict]:
    """(Index, its build settings) of an existing index directory."""
    from ..search import Index

    idx = Index.load(index_dir)
    info = idx.embedder_info
    return idx, {"checkpoint": info.get("checkpoint"), "use_ema": info.get("use_ema"), "root": idx.root,
                 "with_frames": bool(idx.meta.get("with_frames")), "clip_dtype": idx.meta.get("clip_dtype") or "float32"}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..errors import ConfigError, FinelapError
    from ..search import META_FILE, Index
    from ..utils import log
    from ._failures import FileFailures
    from ._pipeline import load_pipeline

    if args.action == "info":
        print(json.dumps(Index.load(args.path).info(), indent=2, default=str))
        return 0
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    # every user error is reported before the model loads
    if args.action == "update":
        if args.out is not None and Path(args.out) != Path(args.path):
            raise FinelapError("index update takes the index directory as its argument, not --out")
        _, rec = _recorded(args.path)
        root, out, with_frames, clip_dtype = rec["root"], Path(args.path), rec["with_frames"], rec["clip_dtype"]
        if root is None:
            raise FinelapError(f"{args.path}: the index does not record the folder it indexes; use `index build FOLDER --out {args.path}`")
        if not Path(root).is_dir():
            raise FinelapError(f"{root}: the folder this index was built from no longer exists")
    else:
        if not args.out:
            raise FinelapError("index build needs --out INDEX_DIR (the index directory to write)")
        root, out = Path(args.path), Path(args.out)
        if not root.is_dir():
            raise FinelapError(f"{root}: not a directory (index build needs a folder of audio files)")
        with_frames, clip_dtype, rec = args.frames, "float16" if args.float16 else "float32", None
        if (out / META_FILE).is_file() and not args.rebuild:
            _, rec = _recorded(str(out))
    if args.checkpoint is None:
        if rec is None or not rec.get("checkpoint"):
            raise FinelapError("index build needs --checkpoint DIR" if args.action == "build"
                               else f"{args.path}: the index does not record its checkpoint; pass --checkpoint")  # fmt: skip
        args.checkpoint = rec["checkpoint"]
        if rec.get("use_ema") is False:
            args.no_ema = True  # the same weights as the stored embeddings (EMA or raw)
        log(f"index: checkpoint {args.checkpoint} (recorded in the index)")
    pipe = load_pipeline(args)
    idx = Index.build(root, pipe, out, with_frames=with_frames, batch_size=args.batch_size,
                      rebuild=args.rebuild, rehash=args.rehash, clip_dtype=clip_dtype)  # fmt: skip
    report = idx.report
    log(report.summary())
    print(json.dumps({"index": str(out), **report.counts(), "failed": report.failed}, indent=2, default=str))
    # the rule of the other multi-file commands: each failed file named with its reason, the others
    # indexed; exit 1 when some failed, 2 when the index holds none
    failures = FileFailures("index", n_inputs=report.total + len(report.failed))
    for f in report.failed:
        failures.add(Path(root) / f["path"], f["error"])
    return failures.exit_status(n_done=report.total)
