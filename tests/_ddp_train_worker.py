"""One rank of a 2-process gloo `finelap.train.loop.train` run (started by test_train_ddp.py
through torch.multiprocessing spawn, as torchrun would: the rendezvous comes from the environment, and
the store it names is held by the parent, as torchrun's agent holds it)."""
from __future__ import annotations

import os
from pathlib import Path


def train_rank(rank: int, world: int, port: int, config: str, overrides: list[str], out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       # as under torchrun: the store at MASTER_PORT is the parent's (its agent's), joined as a client
                       "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"})  # fmt: skip
    import torch

    from finelap.config import load_run_config
    from finelap.train.loop import train

    torch.set_num_threads(1)
    (Path(out) / f"pid{rank}").write_text(str(os.getpid()))
    path = train(load_run_config(config, overrides), progress=False)
    (Path(out) / f"rank{rank}.txt").write_text(str(path))
