"""Worker for test_train.test_two_process_gradients_equal_one_process (run by torchrun or alone)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from finelap.config import load_run_config
from finelap.data.batching import ClipDataset, Collate, MixedBatchSampler, split_by_supervision
from finelap.data.manifests import read_manifest
from finelap.models.build import build_model
from finelap.train import dist
from finelap.train.loop import _sync_gradients, build_clusters, forward_backward
from tinyfactory import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    tmp, man, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    info = dist.init_distributed(device="cpu") if "WORLD_SIZE" in os.environ else None
    rank, ws = (info.rank, info.world_size) if info else (0, 1)
    cfg = load_run_config(REPO / "configs" / "finelap.yaml", tiny_overrides(tmp, man))
    torch.manual_seed(0)
    model = build_model(cfg)
    clips = read_manifest(man)
    clusters = build_clusters(model, clips, cfg)
    ds = ClipDataset(clips, 16000, cfg.audio.clip_seconds, clusters=clusters, phrases_per_clip=cfg.data.phrases_per_clip)
    keys = MixedBatchSampler(split_by_supervision(clips), cfg.data.mix, 8, seed=1).batch_keys(0)
    per = len(keys) // ws
    batch = Collate(model.timeline, cfg.data.phrases_per_clip)([ds[k] for k in keys[rank * per : (rank + 1) * per]])
    terms = forward_backward(model, cfg.loss, batch, clusters, 1, rank=rank, world_size=ws)
    _sync_gradients(model, ws)
    loss = torch.tensor([terms["loss"]])
    if ws > 1:
        loss = dist.all_reduce_mean(loss)
    if rank == 0:
        grads = {n: p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None}
        save_file(grads, str(out / f"grads_ws{ws}.safetensors"))
        (out / f"loss_ws{ws}.txt").write_text(repr(float(loss)))
    if info is not None:
        # barrier, then destroy: rank 1 tearing its group down while rank 0 was still writing the
        # files above made gloo abort ("terminate called without an active exception") ~1 run in 14
        dist.shutdown_distributed(info)


if __name__ == "__main__":
    main()
