"""Embed audio files (or whole folders, recursively) into clip embeddings, optionally frames.

Examples:
  finelap embed sounds/ --out emb.npy --checkpoint CKPT
  finelap embed a.wav b.flac --out emb.npy --frames --checkpoint CKPT

Writes OUT (N, D) float32 L2-normalised clip embeddings, OUT.paths.txt (row i = line i) and, with
--frames, OUT.frames.npz (frames (sum T, D) float32, offsets (N+1,) int64: file i's frames are
frames[offsets[i]:offsets[i+1]], frame_rate_hz). Missing or corrupt files (and broken links) are
skipped, named on stderr and listed in OUT.failed.tsv; they never stop the run, but the exit
status is then 1 (0: every file embedded).
"""
from __future__ import annotations

import argparse

from ._pipeline import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="FILE_OR_DIR", help="audio files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="NPY", help="output .npy of clip embeddings")
    p.add_argument("--frames", action="store_true", help="also write frame embeddings (OUT.frames.npz)")
    p.add_argument("--batch-size", type=int, default=16, help="files encoded together")
    add_model_arguments(p)


def _sibling(out, suffix: str):
    return out.with_name(out.name[: -len(out.suffix)] + suffix if out.suffix else out.name + suffix)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from ..errors import AudioError, ConfigError, FinelapError
    from ..infer import find_audio_files
    from ..utils import atomic_path, log, progress, write_text_atomic
    from ._failures import EXIT_SOME_FAILED
    from ._pipeline import load_pipeline

    out = Path(args.out)
    if out.suffix != ".npy":
        raise ConfigError(f"--out must end in .npy, got {out}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    for item in args.inputs:  # a mistyped argument is a user error; bad files inside folders are skipped
        if not Path(item).exists():
            raise AudioError(item, "file not found")
    files = find_audio_files(args.inputs)
    if not files:
        raise FinelapError(f"no audio files found in {', '.join(args.inputs)}")
    pipe = load_pipeline(args)
    embs, frames, kept, failed = [], [], [], []
    for r in progress(pipe.embed_files(files, with_frames=args.frames, batch_size=args.batch_size), total=len(files), desc="embedding"):
        if r.error is not None:
            log(f"finelap embed: skipped {r.path}: {r.error}")
            failed.append((str(r.path), r.error))
            continue
        kept.append(str(r.path))
        embs.append(np.asarray(r.clip_embedding, dtype=np.float32))
        if args.frames:
            frames.append(np.asarray(r.frame_embeddings, dtype=np.float32))
    failed_path = _sibling(out, ".failed.tsv")
    if failed:
        write_text_atomic(failed_path, "path\terror\n" + "".join(f"{p}\t{e}\n" for p, e in failed))
    elif failed_path.exists():
        failed_path.unlink()  # a stale list from an earlier run would be misleading
    if not kept:
        raise FinelapError(f"none of the {len(files)} file(s) could be embedded (see {failed_path})")
    with atomic_path(out, mode_suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.stack(embs))
    write_text_atomic(_sibling(out, ".paths.txt"), "".join(p + "\n" for p in kept))
    msg = f"{len(kept)} embeddings ({pipe.embed_dim}-d) -> {out}, paths -> {_sibling(out, '.paths.txt')}"
    if args.frames:
        offsets = np.concatenate([[0], np.cumsum([len(f) for f in frames])]).astype(np.int64)
        fpath = _sibling(out, ".frames.npz")
        with atomic_path(fpath, mode_suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, frames=np.concatenate(frames), offsets=offsets, frame_rate_hz=np.float64(pipe.frame_rate_hz))
        msg += f", frames -> {fpath}"
    log(msg)
    if failed:
        log(f"finelap embed: {len(failed)} of {len(files)} files failed and were skipped, listed in {failed_path}")
        return EXIT_SOME_FAILED  # the embeddings of the others are written; the status says some failed
    return 0
