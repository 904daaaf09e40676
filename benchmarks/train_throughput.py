"""Training throughput and model FLOP utilisation (MFU) of a preset on this machine; prints JSON.

    python benchmarks/train_throughput.py [--preset finelap] [--batch 32] [--seconds 10] [--steps 5] [--threads N]

MFU = achieved FLOP/s of a full training step (3 x the forward FLOPs counted with
torch.utils.flop_counter: matmuls and convolutions) / peak matmul FLOP/s measured in the same run
(a large square matmul in the same dtype). Reported for fp32 and bf16 autocast.
The batch is synthetic (noise audio, fixed captions and phrases) so only compute is measured.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def peak_matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def synthetic_batch(model, cfg, batch: int, seconds: float):
    from finelap.data.batching import Collate

    rng = np.random.default_rng(0)
    n = int(seconds * model.sample_rate)
    labels = ["dog barking", "rain", "car horn", "piano", "siren", "speech", "bird", "engine"]
    items = []
    for i in range(batch):
        from finelap.data.types import Event

        k = cfg.data.phrases_per_clip
        phrases = [labels[(i + j) % len(labels)] + ("" if j < len(labels) else f" {j}") for j in range(k)]
        items.append({
            "wave": (0.1 * rng.standard_normal(n)).astype(np.float32), "key": f"b{i}",
            "caption": f"a {labels[i % len(labels)]} in a quiet room, number {i}",
            "phrases": phrases, "positives": {"x": [0]}, "events": [Event("x", 1.0, 4.0)],
            "labels": [labels[i % len(labels)]], "has_events": i % 2 == 0,
        })  # fmt: skip
    return Collate(model.timeline, cfg.data.phrases_per_clip)(items)


def measure(model, loss_cfg, batch, steps: int, precision: str) -> dict:
    from contextlib import nullcontext

    from torch.utils.flop_counter import FlopCounterMode

    from finelap.models.model import param_groups
    from finelap.train.loop import forward_backward

    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    opt = torch.optim.AdamW(param_groups(model, 1e-4, 0.01), lr=1e-4)
    model.train()
    # warm-up first: the frozen text tower's cache fills here, so the counted step is a steady-state
    # step (counting the first call would add the text tower's FLOPs that later steps never spend)
    forward_backward(model, loss_cfg, batch, None, 1, autocast)
    opt.zero_grad(set_to_none=True)
    # FLOPs = 3 x forward FLOPs (backward ~ 2x forward), the usual MFU convention. We do not count
    # the backward directly: torch's FlopCounter counts depthwise (grouped) conv backward as dense
    # convolutions, which inflates this CNN's step ~6x (212 vs ~36 GFLOP measured here).
    from finelap.train.loop import step_texts

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.encode_audio(batch.wave, batch.lengths)
        model.encode_text(step_texts(batch, None).texts)
    flops = 3 * fc.get_total_flops()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        forward_backward(model, loss_cfg, batch, None, 1, autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times[1:]))
    peak = peak_matmul_flops(torch.bfloat16 if precision == "bf16" else torch.float32)
    return {
        "precision": precision,
        "step_s": round(step_s, 4),
        "clips_per_s": round(batch.size / step_s, 2),
        "audio_seconds_per_s": round(float(batch.lengths.sum()) / model.sample_rate / step_s, 1),
        "gflop_per_step": round(flops / 1e9, 2),
        "achieved_gflops": round(flops / step_s / 1e9, 2),
        "peak_matmul_gflops": round(peak / 1e9, 2),
        "mfu": round(flops / step_s / peak, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="finelap")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from finelap.config import load_run_config
    from finelap.models.build import build_model

    cfg = load_run_config(REPO / "configs" / f"{args.preset}.yaml", args.overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = synthetic_batch(model, cfg, args.batch, args.seconds)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = [measure(model, cfg.loss, batch, args.steps, p) for p in args.precisions]
    print(json.dumps({
        "benchmark": "train_throughput", "preset": args.preset, "batch": args.batch, "clip_seconds": args.seconds,
        "threads": torch.get_num_threads(), "trainable_params_M": round(n_params / 1e6, 3),
        "audio_encoder": cfg.model.audio_encoder, "results": rows,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
