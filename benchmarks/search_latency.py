"""Query latency of the search index at 1,000,000 clip embeddings, faiss vs numpy. Prints JSON.

The parent process writes an index of `--n` random L2-normalised float32 embeddings of dimension
`--dim` (1e6 x 256 = 1 GB) to a temporary directory with `Index.from_arrays(...).save()`, the
same writer `Index.build` uses. Each backend then runs in a fresh subprocess, so its memory is
its own: `Index.load` (metadata, the 1e6-line file list, memory-mapped arrays), backend set-up
(faiss `IndexFlatIP.add`, or numpy reading the matrix into RAM), a few warm-up queries, then
`--queries` single-query searches timed one by one (median, p95), one batched call with all the
queries, and `Index.search` with a dummy text embedder (the full path minus the text model: text
embedding, top-k, Hit objects). Both backends must return the same top-k rows; the JSON says
whether they did.

Not measured: the model. Building a real index is dominated by audio decoding and the encoder;
the text encoder adds its own latency to every query.

    python benchmarks/search_latency.py [--n 1000000] [--dim 256] [--queries 100] [--k 10]
                                        [--backends faiss,numpy] [--dir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> dict[str, float]:
    """Current and peak resident set size of this process (Linux /proc; ru_maxrss elsewhere)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss_mb" if line.startswith("VmRSS") else "peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_mb"] = round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)
    return out


def _queries(n: int, dim: int, seed: int = 1) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


class _DummyTextEmbedder:
    """Returns fixed random text vectors, so `Index.search` runs end to end without a model."""

    def __init__(self, embedder_id: str, vecs: np.ndarray) -> None:
        self.embedder_id = embedder_id
        self.vecs = vecs
        self.i = 0

    def embed_files(self, paths, *, with_frames=False):  # pragma: no cover - not used here
        raise NotImplementedError

    def embed_text(self, texts):
        out = self.vecs[[(self.i + j) % len(self.vecs) for j in range(len(texts))]]
        self.i += len(texts)
        return out


def _child(cfg: dict) -> dict:
    from finelap.search import Index

    try:
        from threadpoolctl import threadpool_info

        blas = [{k: i.get(k) for k in ("internal_api", "num_threads")} for i in threadpool_info()]
    except ImportError:
        blas = None
    q = _queries(cfg["queries"], cfg["dim"])
    t0 = time.perf_counter()
    idx = Index.load(cfg["dir"], backend=cfg["backend"])
    t_load = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    t0 = time.perf_counter()
    name = idx.backend  # sets the backend up (faiss add / numpy read into RAM)
    t_add = time.perf_counter() - t0
    if name != cfg["backend"]:
        raise SystemExit(f"asked for backend {cfg['backend']}, got {name}")
    k = cfg["k"]
    for i in range(5):  # warm-up
        idx.search_vectors(q[i], k)
    lat, ids = [], []
    for i in range(len(q)):
        t0 = time.perf_counter()
        _, rows = idx.search_vectors(q[i], k)
        lat.append(time.perf_counter() - t0)
        ids.append(rows[0].tolist())
    t0 = time.perf_counter()
    _, batch_rows = idx.search_vectors(q, k)
    t_batch = time.perf_counter() - t0
    emb = _DummyTextEmbedder(idx.embedder_id, q)
    full = []
    for i in range(min(len(q), 20)):
        t0 = time.perf_counter()
        hits = idx.search("dummy query", k=k, embedder=emb)
        full.append(time.perf_counter() - t0)
        assert [h.rel_path for h in hits] == [idx.records[r].path for r in ids[i]]
    lat_ms = np.asarray(lat) * 1e3
    threads = None
    if name == "faiss":
        import faiss

        threads = faiss.omp_get_max_threads()
    return {
        "backend": name,
        "faiss_threads": threads,
        "threadpools": blas,
        "load_s": round(t_load, 3),
        "add_s": round(t_add, 3),
        "query_ms_median": round(float(np.median(lat_ms)), 3),
        "query_ms_p95": round(float(np.percentile(lat_ms, 95)), 3),
        "query_ms_min": round(float(lat_ms.min()), 3),
        "batch_ms_per_query": round(t_batch * 1e3 / len(q), 3),
        "search_with_hits_ms_median": round(float(np.median(full)) * 1e3, 3),
        "memory_after_load": rss_loaded,
        "memory_after_add_and_queries": _rss_mb(),
        "batch_matches_single": bool((batch_rows.tolist() == ids)),
        "top_ids": ids,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="number of clip embeddings")
    ap.add_argument("--dim", type=int, default=256, help="embedding dimension")
    ap.add_argument("--queries", type=int, default=100, help="timed single queries per backend")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--backends", default="faiss,numpy", help="comma-separated: faiss, numpy")
    ap.add_argument("--threads", type=int, default=None,
                    help="limit BLAS/OpenMP threads in the timed processes (default: library default)")
    ap.add_argument("--dir", help="where to write the index (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the index directory afterwards")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0

    from finelap.search import Index, faiss_available

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "faiss" in backends and not faiss_available():
        print("faiss is not installed; benchmarking numpy only", file=sys.stderr)
        backends = [b for b in backends if b != "faiss"]
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="finelap-search-bench-"))
    out = work / "index"
    result: dict = {
        "n": args.n, "dim": args.dim, "k": args.k, "queries": args.queries, "threads": args.threads,
        "clip_mb": round(args.n * args.dim * 4 / 2**20, 1),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "numpy": np.__version__},
    }
    try:
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        clip = np.empty((args.n, args.dim), np.float32)
        for s in range(0, args.n, 1 << 16):  # chunked: no float64 copy of the whole matrix
            block = rng.standard_normal((min(1 << 16, args.n - s), args.dim), dtype=np.float32)
            clip[s : s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        paths = [f"lib/{i // 1000:04d}/sound_{i:07d}.wav" for i in range(args.n)]
        result["generate_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        idx = Index.from_arrays(clip, paths, embedder_id="bench-random", root=work / "lib", backend="numpy")
        del clip
        idx.save(out)
        result["save_s"] = round(time.perf_counter() - t0, 3)
        result["index_dir_mb"] = round(sum(p.stat().st_size for p in out.iterdir()) / 2**20, 1)
        del idx
        runs = {}
        for b in backends:
            cfg = {"dir": str(out), "backend": b, "queries": args.queries, "k": args.k, "dim": args.dim}
            env = dict(os.environ)
            if args.threads:
                for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                    env[var] = str(args.threads)
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                runs[b] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
                continue
            runs[b] = json.loads(proc.stdout)
        ok = [r for r in runs.values() if "top_ids" in r]
        if len(ok) >= 2:
            result["backends_agree_topk"] = all(r["top_ids"] == ok[0]["top_ids"] for r in ok[1:])
        for r in runs.values():
            r.pop("top_ids", None)
        result["backends"] = runs
    finally:
        if not args.keep:
            shutil.rmtree(out if args.dir else work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
