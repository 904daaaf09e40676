"""One rank of a 2-process gloo `finelap.train.loop.train` run (started by test_train_ddp.py
through torch.multiprocessing spawn, as torchrun would: the rendezvous comes from the environment)."""
from __future__ import annotations

import os
from pathlib import Path


def train_rank(rank: int, world: int, port: int, config: str, overrides: list[str], out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    import torch

    from finelap.config import load_run_config
    from finelap.train.loop import train

    torch.set_num_threads(1)
    (Path(out) / f"pid{rank}").write_text(str(os.getpid()))
    path = train(load_run_config(config, overrides), progress=False)
    (Path(out) / f"rank{rank}.txt").write_text(str(path))
