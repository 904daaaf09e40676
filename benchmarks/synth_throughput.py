"""Throughput of `finelap synth`: 10-s, 16-kHz soundscapes written as 16-bit FLAC (plus manifest,
DCASE TSVs and captions), in soundscapes per second. Prints one JSON object.

Pool: ../shared/data/esc50-dev (relative to the repository) when present, else a synthetic pool of
generated tones, chirps and noise bursts written to a temporary folder (the JSON says which).
`soundscapes_per_s` times rendering + writing (the pool is loaded, resampled and trimmed once
beforehand, as in any large run; that time is reported separately as `pool_load_s`).

    python benchmarks/synth_throughput.py [--n 400] [--workers 2] [--pool PATH] [--synthetic]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ESC50 = REPO.parent / "shared" / "data" / "esc50-dev"
TARGET_PER_S = 100.0


def synthetic_pool(root: Path, classes: int = 8, per_class: int = 8, sr: int = 22050, seed: int = 0) -> Path:
    """Folder-per-class pool of generated sounds (0.3-4 s, some with silent padding)."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    kinds = ["tone", "chirp", "noise", "clicks", "am_tone", "pink_burst", "two_tone", "sweep_down"]
    for c in range(classes):
        kind = kinds[c % len(kinds)]
        d = root / f"{kind}_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            n = int(rng.uniform(0.3, 4.0) * sr)
            t = np.arange(n) / sr
            f0 = rng.uniform(200, 3000)
            if kind == "tone":
                x = np.sin(2 * np.pi * f0 * t)
            elif kind == "chirp":
                x = np.sin(2 * np.pi * (f0 * t + 800 * t**2))
            elif kind == "noise":
                x = rng.standard_normal(n)
            elif kind == "clicks":
                x = np.zeros(n)
                x[:: int(0.1 * sr)] = 1.0
            elif kind == "am_tone":
                x = np.sin(2 * np.pi * f0 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
            elif kind == "pink_burst":
                x = np.cumsum(rng.standard_normal(n))
                x -= np.convolve(x, np.ones(64) / 64, mode="same")
            elif kind == "two_tone":
                x = np.sin(2 * np.pi * np.where((t * 2).astype(int) % 2 == 0, f0, 1.5 * f0) * t)
            else:
                x = np.sin(2 * np.pi * (f0 * t - 300 * t**2))
            x = 0.5 * x / max(1e-9, float(np.max(np.abs(x))))
            pad = np.zeros(int(rng.uniform(0, 0.3) * sr))
            sf.write(d / f"{i}.wav", np.concatenate([pad, x, pad]).astype(np.float32), sr)
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400, help="soundscapes to write (train split)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pool", default=None, help="pool to use (default: ESC-50 dev set if present, else synthetic)")
    ap.add_argument("--synthetic", action="store_true", help="force the synthetic pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default=None, help="write into this folder and keep it (default: a temp folder)")
    args = ap.parse_args(argv)
    os.environ.setdefault("FINELAP_NO_PROGRESS", "1")

    from finelap.data.manifests import load_clips
    from finelap.data.synth import SynthConfig, load_pool, synthesize

    tmp = Path(tempfile.mkdtemp(prefix="finelap_synth_bench_"))
    try:
        if args.pool:
            pool_desc, clips = f"user: {args.pool}", load_clips(args.pool, check_audio=False)
        elif not args.synthetic and (ESC50 / "meta" / "esc50.csv").exists():
            pool_desc = "esc50-dev (real ESC-50 clips, 44.1 kHz ogg)"
            clips = load_clips(ESC50 / "meta" / "esc50.csv", audio_dir=ESC50 / "audio", check_audio=False)
        else:
            why = "--synthetic" if args.synthetic else f"ESC-50 not found at {ESC50}"
            pool_desc = f"synthetic (generated tones/chirps/noise bursts; {why})"
            clips = load_clips(synthetic_pool(tmp / "pool"), check_audio=False)
        cfg = SynthConfig(splits={"train": args.n}, seed=args.seed, duration=10.0, sample_rate=16000, format="flac")
        t0 = time.perf_counter()
        pool, skipped = load_pool(clips, cfg, workers=args.workers)
        load_s = time.perf_counter() - t0
        out = Path(args.keep) if args.keep else tmp / "out"
        t1 = time.perf_counter()
        res = synthesize(pool, out, cfg, workers=args.workers, plot=True)
        total_s = time.perf_counter() - t1
        n_files = len(list((out / "train" / "audio").glob("*.flac")))
        mb = sum(p.stat().st_size for p in (out / "train" / "audio").glob("*.flac")) / 1e6
        st = res.stats["splits"]["train"]
        report = {
            "benchmark": "synth_throughput",
            "pool": pool_desc,
            "pool_clips": len(clips),
            "pool_sources": len(pool.sources),
            "pool_skipped": len(skipped),
            "pool_load_s": round(load_s, 2),
            "n_soundscapes": args.n,
            "flac_files_written": n_files,
            "flac_mb": round(mb, 1),
            "duration_s": cfg.duration,
            "sample_rate": cfg.sample_rate,
            "events": st["n_events"],
            "workers": args.workers,
            "cpu_count": os.cpu_count(),
            "render_write_s": round(res.render_s, 2),
            "soundscapes_per_s": round(res.soundscapes_per_s, 1),
            "with_stats_and_plot_s": round(total_s, 2),
            # CPU time per soundscape inside the workers: independent of other load on the machine;
            # workers / cpu time is the rate the machine would reach with its cores to itself
            "cpu_ms_per_soundscape": round(1000 * res.cpu_s_per_soundscape, 2),
            "cpu_bound_soundscapes_per_s": round(args.workers / max(res.cpu_s_per_soundscape, 1e-9), 1),
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "target_per_s": TARGET_PER_S,
            "meets_target": res.soundscapes_per_s >= TARGET_PER_S,
            "python": platform.python_version(),
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
