"""Parameters, forward FLOPs and CPU forward time of the default audio encoders; prints JSON.

    python benchmarks/model_flops.py [--batch 8] [--seconds 10] [--threads 1 2] [--reps 5]

FLOPs are counted with torch.utils.flop_counter (matmuls and convolutions; 1 multiply-add = 2 FLOPs).
Time: median and min of `reps` inference-mode forwards after one warm-up, per thread count
(GFLOP/s and real-time factor use the min). Other processes
on the machine inflate the numbers: compare runs made side by side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--encoders", nargs="+", default=["cnn", "transformer"])
    args = ap.parse_args()

    from torch.utils.flop_counter import FlopCounterMode

    from finelap.models import build_audio_encoder

    results = []
    for name in args.encoders:
        torch.manual_seed(0)
        enc = build_audio_encoder(name).eval()
        n = int(args.seconds * enc.sample_rate)
        wave = 0.1 * torch.randn(args.batch, n)
        lengths = torch.full((args.batch,), n)
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            out = enc(wave, lengths)
        row = {
            "encoder": name,
            "params_M": round(sum(p.numel() for p in enc.parameters()) / 1e6, 3),
            "batch": args.batch,
            "seconds": args.seconds,
            "frames": int(out.frames.shape[1]),
            "frame_rate_hz": enc.timeline.frame_rate_hz,
            "dim": enc.dim,
            "gflops_forward": round(fc.get_total_flops() / 1e9, 2),
            "forward_s": {},
        }
        for nt in args.threads:
            torch.set_num_threads(nt)
            with torch.inference_mode():
                enc(wave, lengths)
                ts = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    enc(wave, lengths)
                    ts.append(time.perf_counter() - t0)
            med, best = statistics.median(ts), min(ts)
            row["forward_s"][f"{nt}_threads"] = {"median": round(med, 4), "min": round(best, 4)}
            row[f"gflops_per_s_{nt}_threads"] = round(row["gflops_forward"] / best, 1)
            row[f"realtime_factor_{nt}_threads"] = round(args.batch * args.seconds / best, 1)
        results.append(row)
    print(json.dumps({"torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
