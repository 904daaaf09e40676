"""Peak memory of the frame losses (forward + backward) against the number of phrases K, the
number of frames T and (FLAM) the batch size, full autograd versus chunked. Prints JSON.

Each configuration runs in a fresh subprocess. On CPU (Linux) the peak is the growth of the
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) over the resident set
once the inputs exist and after a warm-up pass, with glibc told to mmap every block over 64 KiB
so that freed tensors leave the resident set; on CUDA it is ``torch.cuda.max_memory_allocated`` over
the same baseline. The peak includes the input gradients (frames and phrases), which any
implementation must return; ``grad_mb`` reports their size and ``logits_mb`` the size of one
(B, T, K) float32 tensor, for reading the numbers.

Implementations:
  full              plain autograd over the whole (B, T, K) logits (``chunk_size=None``)
  chunked_autograd  a loop over phrase chunks with plain autograd: forward memory is chunked,
                    but every chunk's intermediates are saved for backward (shown for contrast)
  chunked           finelap's fused chunked path (``chunk_size``): loss and analytic gradient
                    computed chunk by chunk, nothing (B, T, K)-sized is kept

    python benchmarks/frame_loss_memory.py [--quick] [--device cpu|cuda] [--chunk 16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def _one(cfg: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from finelap.losses import finelap_frame_loss, flam_frame_loss

    torch.set_num_threads(1)
    dev = torch.device(cfg["device"])
    b, t, k, d = cfg["B"], cfg["T"], cfg["K"], cfg["D"]
    g = torch.Generator().manual_seed(0)

    def inputs(b, t, k, d):
        frames = F.normalize(torch.randn(b, t, d, generator=g), dim=-1).to(dev).requires_grad_()
        cols_shape = (b, k, d) if cfg["loss"] == "finelap" else (k, d)
        cols = F.normalize(torch.randn(*cols_shape, generator=g), dim=-1).to(dev).requires_grad_()
        targets = (torch.rand(b, t, k, generator=g) > 0.9).float().to(dev)
        scale = torch.tensor(10.0, device=dev, requires_grad=True)
        bias = torch.tensor(-5.0, device=dev, requires_grad=True)
        if cfg["loss"] == "flam":
            scale = torch.full((k,), 10.0, device=dev, requires_grad=True)
            bias = torch.full((k,), -8.0, device=dev, requires_grad=True)
        fmask = torch.ones(b, t, dtype=torch.bool, device=dev)
        pmask = torch.ones(b, k, dtype=torch.bool, device=dev)
        has = torch.ones(b, dtype=torch.bool, device=dev)
        return frames, cols, targets, scale, bias, fmask, pmask, has

    def run(frames, cols, targets, scale, bias, fmask, pmask, has):
        impl, chunk = cfg["impl"], cfg["chunk"]
        if impl == "chunked_autograd":
            total = frames.new_zeros(())
            for s in range(0, cols.shape[-2], chunk):
                sl = slice(s, s + chunk)
                c = cols[:, sl] if cfg["loss"] == "finelap" else cols[sl]
                eq = "btd,bkd->btk" if cfg["loss"] == "finelap" else "btd,kd->btk"
                sc = scale if scale.dim() == 0 else scale[sl]
                bi = bias if bias.dim() == 0 else bias[sl]
                z = torch.einsum(eq, frames, c) * sc + bi
                total = total + F.binary_cross_entropy_with_logits(z, targets[:, :, sl], reduction="sum")
            loss = total / targets.numel()
        elif cfg["loss"] == "finelap":
            loss = finelap_frame_loss(frames, fmask, cols, targets, pmask, has, scale, bias, chunk_size=None if impl == "full" else chunk)
        else:
            loss = flam_frame_loss(frames, fmask, cols, scale, bias, targets, chunk_size=None if impl == "full" else chunk)
        loss.backward()
        return float(loss)

    def cpu_status(key: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset_peak() -> int:
        """Start a new peak window; returns the baseline in bytes."""
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
            return torch.cuda.memory_allocated(dev)
        with open("/proc/self/clear_refs", "w") as fh:  # "5" resets VmHWM to the current RSS
            fh.write("5")
        return cpu_status("VmRSS")

    def peak() -> int:
        if dev.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(dev)
        return cpu_status("VmHWM")

    run(*inputs(2, 8, 4, d))  # warm-up: kernels, autograd engine, allocator pools
    data = inputs(b, t, k, d)
    base = reset_peak()
    t0 = time.perf_counter()
    value = run(*data)
    seconds = time.perf_counter() - t0
    peak_b = peak() - base
    grad_bytes = sum(x.numel() * 4 for x in data[:2])
    return {
        **{key: cfg[key] for key in ("loss", "impl", "B", "T", "K", "D")},
        "chunk": cfg["chunk"] if cfg["impl"] != "full" else None,
        "peak_mb": round(peak_b / 2**20, 1),
        "grad_mb": round(grad_bytes / 2**20, 1),
        "logits_mb": round(b * t * k * 4 / 2**20, 1),
        "seconds": round(seconds, 3),
        "loss_value": round(value, 6),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--chunk", type=int, default=16, help="phrases/texts per chunk (LossConfig default: 16)")
    ap.add_argument("--quick", action="store_true", help="fewer, smaller configurations")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(json.loads(args.one))))
        return 0
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    b, d = 32, 128
    ks = [16, 64, 256] if args.quick else [16, 64, 256, 1024]
    ts = [64, 256] if args.quick else [64, 250, 1000]
    flam_bs = [8, 32] if args.quick else [8, 16, 32, 64]
    impls = ["full", "chunked_autograd", "chunked"]
    configs = []
    for impl in impls:
        configs += [dict(loss="finelap", impl=impl, B=b, T=250, K=k, D=d) for k in ks]
        configs += [dict(loss="finelap", impl=impl, B=b, T=t, K=64, D=d) for t in ts if t != 250]
        # FLAM: every audio x every text; the batch's texts grow with the batch (2 per clip)
        configs += [dict(loss="flam", impl=impl, B=fb, T=250, K=2 * fb, D=d) for fb in flam_bs]
    # Large blocks are mmapped and unmapped on free, so the resident-set peak tracks live tensors
    # (glibc's adaptive threshold would otherwise keep freed blocks resident and reuse them).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    results = []
    for cfg in configs:
        cfg = {**cfg, "chunk": args.chunk, "device": device}
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            results.append({**cfg, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"})
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(
        json.dumps(
            {
                "benchmark": "frame_loss_memory",
                "device": device,
                "measure": "peak RSS growth (VmHWM after clear_refs)" if device == "cpu" else "torch.cuda.max_memory_allocated growth",
                "platform": platform.platform(),
                "chunk": args.chunk,
                "results": results,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
