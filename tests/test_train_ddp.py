"""2-process gloo training runs end together: every reason to stop is agreed across ranks.

Before the fix, rank 0 read the clock after its rank-0-only validation and went to save `final`
(a barrier) while rank 1 was already waiting in the next step's all_gather; a SIGTERM to one rank
desynchronised them the same way. Both hung until the 30-minute process-group timeout. Each test
here has its own deadline and kills the ranks when it passes, so a regression fails, never hangs.
"""
from __future__ import annotations

import csv
import datetime
import os
import signal
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from _ddp_train_worker import train_rank
from tinyfactory import tiny_dataset, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 240  # far above the ~30 s a run takes on 2 busy cores; far below the 1800-s gloo timeout

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available")


def _agent_store() -> dist.TCPStore:
    """The rendezvous store, held by this process as torchrun's agent holds it (the ranks join it
    with TORCHELASTIC_USE_AGENT_STORE): the OS picks the port as the store binds it, so no other
    process can take it between choosing a free port and binding it (the old race)."""
    return dist.TCPStore("127.0.0.1", 0, 3, True, timeout=datetime.timedelta(seconds=DEADLINE_S), wait_for_workers=False)


def _start(tmp_path: Path, extra: list[str]):
    man = tiny_dataset(tmp_path / "data", n=16)
    ov = [o for o in tiny_overrides(tmp_path, man, out="run") if not o.startswith("train.max_steps")]
    ov += ["train.max_steps=100000", "train.device=cpu", *extra]
    out = tmp_path / "out"
    out.mkdir()
    store = _agent_store()
    ctx = mp.start_processes(
        train_rank, args=(2, store.port, str(REPO / "configs" / "finelap.yaml"), ov, str(out)),
        nprocs=2, join=False, start_method="spawn",
    )  # fmt: skip
    ctx.store = store  # kept alive as long as the ranks run
    return ctx, out, tmp_path / "run"


def _join(ctx, deadline: float) -> None:
    """Wait for both ranks; past the deadline kill them and fail (a desync hangs, it does not crash)."""
    try:
        while not ctx.join(timeout=1):
            if time.time() > deadline:
                pytest.fail(f"the 2 ranks did not finish within {DEADLINE_S} s: they are out of step (deadlock)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in ctx.processes] == [0, 0]


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_time_budget_ends_both_ranks_at_the_same_step(tmp_path):
    """train.max_minutes with rank-0 validation after every step (the audit's command, scaled down)."""
    man = tiny_dataset(tmp_path / "val", n=16, seed=1)
    ctx, out, run = _start(tmp_path, ["train.max_minutes=0.05", "train.eval_every=1", f"data.val=[{man}]"])
    _join(ctx, time.time() + DEADLINE_S)
    paths = [(out / f"rank{r}.txt").read_text() for r in range(2)]
    assert paths == [str(run / "final")] * 2
    steps = [int(r["step"]) for r in _rows(run) if r.get("train/loss")]
    assert 1 <= steps[-1] < 100000 and steps == list(range(1, steps[-1] + 1))


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path):
    ctx, out, run = _start(tmp_path, [])
    deadline = time.time() + DEADLINE_S
    try:
        while time.time() < deadline and not ((run / "metrics.csv").exists() and len(_rows(run)) >= 3):
            assert all(p.is_alive() for p in ctx.processes), "a rank died before the signal"
            time.sleep(0.5)
        os.kill(int((out / "pid1").read_text()), signal.SIGTERM)  # rank 1 only
    except BaseException:
        for p in ctx.processes:
            p.kill()
        raise
    _join(ctx, deadline)
    paths = [Path((out / f"rank{r}.txt").read_text()) for r in range(2)]
    assert paths[0] == paths[1] and paths[0].name.startswith("step-"), paths
    assert (run / "LATEST").read_text().strip() == paths[0].name
    assert (paths[0] / "model.safetensors").is_file() and not (run / "final").exists()
