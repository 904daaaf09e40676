"""Checkpoints: bitwise resume, atomic saves, tied weights, clear errors, pickled files refused and never unpickled."""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import finelap
from finelap.config import RunConfig, resolve_run_config
from finelap.errors import CheckpointError
from finelap import checkpoint as ck  # the file I/O (monkeypatched below) lives here
from finelap.train.checkpoint import (
    FORMAT_VERSION,
    capture_rng,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_optimizer,
    restore_rng,
    restore_training_state,
    rotate_checkpoints,
    save_checkpoint,
)


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 3))


def make_run(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = TinyMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * 0.5 * (1 + math.cos(math.pi * s / 20)))
    return model, opt, sched


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, n: int) -> None:
    """Every global RNG feeds the update: torch (data + dropout), numpy (noise scale), python (target shift)."""
    model.train()
    for _ in range(n):
        x = torch.randn(8, 6) * float(np.random.uniform(0.5, 1.5))
        y = torch.randint(0, 3, (8,))
        y = (y + random.randint(0, 2)) % 3
        loss = nn.functional.cross_entropy(model.net(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_resume_is_bitwise_identical(tmp_path: Path) -> None:
    n = 5
    seed_all(123)
    ref_model, ref_opt, ref_sched = make_run(0)
    seed_all(123)
    train_steps(ref_model, ref_opt, ref_sched, 2 * n)

    seed_all(123)
    model, opt, sched = make_run(0)
    seed_all(123)
    train_steps(model, opt, sched, n)
    cfg = RunConfig()
    save_checkpoint(tmp_path / "run" / checkpoint_name(n), model.state_dict(), cfg, step=n, optimizer=opt, scheduler=sched)
    del model, opt, sched

    # a "new process": different init, different RNG states, fresh optimizer/scheduler
    seed_all(999)
    model2, opt2, sched2 = make_run(7)
    ckpt = load_checkpoint(tmp_path / "run")  # run dir -> LATEST
    model2.load_state_dict(ckpt.state_dict)
    assert restore_training_state(ckpt, opt2, sched2) == n
    train_steps(model2, opt2, sched2, n)

    for (name, a), b in zip(ref_model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    ref_state, state = ref_opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in ref_state:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ref_state[k][key], state[k][key]), (k, key)
    assert ref_sched.state_dict()["_last_lr"] == sched2.state_dict()["_last_lr"]


def test_resume_without_rng_restore_diverges(tmp_path: Path) -> None:
    """Control for the test above: the RNG state is what makes the continuation identical."""
    seed_all(1)
    model, opt, sched = make_run(0)
    train_steps(model, opt, sched, 3)
    save_checkpoint(tmp_path / "c", model, {}, step=3, optimizer=opt, scheduler=sched)
    expected_next = torch.randn(4)
    ckpt = load_checkpoint(tmp_path / "c")
    restore_rng(ckpt.rng_state)
    assert torch.equal(torch.randn(4), expected_next)
    seed_all(2)
    assert not torch.equal(torch.randn(4), expected_next)


def test_rng_state_round_trip_all_generators(tmp_path: Path) -> None:
    seed_all(5)
    random.random(), np.random.normal(), torch.randn(1)  # mid-stream, with numpy's cached gaussian
    state = capture_rng()
    save_checkpoint(tmp_path / "c", {"w": torch.zeros(1)}, {}, step=0)
    want = (random.random(), np.random.normal(), torch.randn(3))
    seed_all(77)
    restore_rng(load_checkpoint(tmp_path / "c").rng_state)
    got = (random.random(), np.random.normal(), torch.randn(3))
    assert want[:2] == got[:2] and torch.equal(want[2], got[2])
    assert state["numpy"][1].dtype == np.uint32


def test_config_json_is_self_describing(tmp_path: Path) -> None:
    cfg = resolve_run_config({"preset": "finelap", "name": "demo", "eval": {"prompt_template": "a {} sound"},
                              "audio": {"n_mels": 80}})
    out = save_checkpoint(tmp_path / "run" / "final", {"w": torch.arange(4.0)}, cfg, step=42,
                          preprocessing={"frame_rate_hz": 25.0}, rng=False,
                          extra_json={"phrase_bank": {"phrases": ["dog bark"], "clusters": [0]}})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "phrase_bank.json"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["finelap_version"] == finelap.__version__
    assert (meta["step"], meta["preset"], meta["name"]) == (42, "finelap", "demo")
    pre = meta["preprocessing"]
    assert pre["n_mels"] == 80 and pre["sample_rate"] == 16000 and pre["hop_length"] == 160
    assert pre["frame_rate_hz"] == 25.0 and pre["prompt_template"] == "a {} sound"
    ckpt = load_checkpoint(out)
    assert resolve_run_config(ckpt.config) == cfg  # evaluation needs nothing but the directory
    assert ckpt.extra == {"phrase_bank": {"phrases": ["dog bark"], "clusters": [0]}}
    assert ckpt.optimizer_state is None and ckpt.rng_state is None and ckpt.step == 42
    assert (tmp_path / "run" / "LATEST").read_text().strip() == "final"


def test_tied_and_view_tensors(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight  # tied
            self.register_buffer("head", self.emb.weight.detach()[:5])  # a view sharing storage
            self.register_buffer("t", torch.randn(3, 4).t())  # non-contiguous

    torch.manual_seed(0)
    m = Tied()
    save_checkpoint(tmp_path / "c", m, {}, step=0, ema_state=m.state_dict(), rng=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert len(stored) == 3 and "head" in stored and "t" in stored  # the tied weight is stored once
    ckpt = load_checkpoint(tmp_path / "c")
    assert list(ckpt.state_dict) == list(m.state_dict())
    assert ckpt.state_dict["emb.weight"] is ckpt.state_dict["out.weight"]
    m2 = Tied()
    m2.load_state_dict(ckpt.state_dict)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert m2.out.weight is m2.emb.weight
    assert all(torch.equal(ckpt.ema_state[k], v) for k, v in m.state_dict().items())


def test_bf16_and_int_tensors_round_trip(tmp_path: Path) -> None:
    sd = {"a": torch.randn(3, 2).to(torch.bfloat16), "b": torch.arange(5), "c": torch.tensor(True), "s": torch.tensor(2.5)}
    save_checkpoint(tmp_path / "c", sd, {}, step=1, rng=False, trainer_state={"ema_updates": 7, "best": {"top1": 0.5},
                                                                             "gen": np.random.default_rng(3).bit_generator.state})
    ckpt = load_checkpoint(tmp_path / "c")
    for k, v in sd.items():
        assert ckpt.state_dict[k].dtype == v.dtype and torch.equal(ckpt.state_dict[k], v)
    assert ckpt.trainer_state["ema_updates"] == 7 and ckpt.trainer_state["best"] == {"top1": 0.5}
    g = np.random.default_rng(0)
    g.bit_generator.state = ckpt.trainer_state["gen"]  # 128-bit PCG64 ints survive JSON exactly
    assert g.integers(1 << 30) == np.random.default_rng(3).integers(1 << 30)


def test_crash_mid_save_keeps_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run" / "step-00000001"
    save_checkpoint(path, {"w": torch.ones(3)}, {"name": "old"}, step=1, rng=False)
    real_write = ck._write_json

    def crashing_write(p: Path, obj: object) -> None:
        if p.name == "config.json":
            p.write_text('{"format_version": 1, "trunc')  # half-written file, then the crash
            raise OSError("disk full")
        real_write(p, obj)

    monkeypatch.setattr(ck, "_write_json", crashing_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(3)}, {"name": "new"}, step=2, extra_json={"x": 1})
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["LATEST", "step-00000001"]  # no temp dirs
    old = load_checkpoint(path)
    assert torch.equal(old.state_dict["w"], torch.ones(3)) and old.config == {"name": "old"} and old.step == 1

    # a KeyboardInterrupt (Ctrl-C) mid-write behaves the same
    monkeypatch.setattr(ck, "_save_tensors", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": torch.zeros(3)}, {}, step=2)
    monkeypatch.undo()
    assert load_checkpoint(path).step == 1 and len(list((tmp_path / "run").iterdir())) == 2

    # overwriting succeeds and replaces the content
    save_checkpoint(path, {"w": torch.zeros(3)}, {"name": "new"}, step=2, rng=False)
    assert load_checkpoint(path).step == 2 and len(list((tmp_path / "run").iterdir())) == 2


def test_recovery_after_hard_kill(tmp_path: Path) -> None:
    """A SIGKILL can strike between renames: only the backup of the old checkpoint exists, next to a
    stale temp dir. Loading still finds the old checkpoint; the next save restores and cleans up."""
    path = tmp_path / "step-00000003"
    save_checkpoint(path, {"w": torch.ones(2)}, {}, step=3, rng=False)
    backup = tmp_path / ".step-00000003.old-abc"
    path.rename(backup)
    (tmp_path / ".step-00000003.tmp-xyz").mkdir()
    (tmp_path / ".step-00000003.tmp-xyz" / "model.safetensors").write_bytes(b"partial")
    assert load_checkpoint(path).step == 3
    save_checkpoint(tmp_path / "step-00000004", {"w": torch.ones(2)}, {}, step=4, rng=False)
    save_checkpoint(path, {"w": torch.zeros(2)}, {}, step=3, rng=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-00000003", "step-00000004"]
    # a half-deleted backup (config.json goes first) is never mistaken for a checkpoint
    gone = tmp_path / "step-00000005"
    (tmp_path / ".step-00000005.old-q").mkdir()
    (tmp_path / ".step-00000005.old-q" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(gone)
    save_checkpoint(gone, {"w": torch.ones(2)}, {}, step=5, rng=False)
    assert not list(tmp_path.glob(".*")) and load_checkpoint(gone).step == 5


def test_latest_and_rotation(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None and list_checkpoints(run) == []
    for s in (10, 20, 30, 40):
        save_checkpoint(run / checkpoint_name(s), {"w": torch.full((1,), float(s))}, {}, step=s, rng=False)
    save_checkpoint(run / "final", {"w": torch.zeros(1)}, {}, step=40, rng=False, update_latest=False)
    assert latest_checkpoint(run) == run / "step-00000040"
    assert [p.name for p in rotate_checkpoints(run, keep_last=2)] == ["step-00000010", "step-00000020"]
    assert sorted(p.name for p in run.iterdir()) == ["LATEST", "final", "step-00000030", "step-00000040"]
    (run / "LATEST").write_text("step-00000030\n")
    assert rotate_checkpoints(run, keep_last=1) == []  # LATEST's target is protected
    (run / "LATEST").write_text("gone\n")  # dangling pointer: fall back to the highest step
    assert latest_checkpoint(run) == run / "step-00000040"
    assert load_checkpoint(run).state_dict["w"].item() == 40.0
    (run / ".step-00000030.rm-x").mkdir()  # interrupted rotation leftover: swept, never listed
    assert [p.name for p in list_checkpoints(run)] == ["step-00000030", "step-00000040"]
    rotate_checkpoints(run, keep_last=5)
    assert not list(run.glob(".*"))


def test_errors_are_one_line_and_clear(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope: checkpoint directory does not exist$"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: not a finelap checkpoint: missing config\.json$"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="expected a directory"):
        load_checkpoint(tmp_path / "file")

    good = save_checkpoint(tmp_path / "c", {"w": torch.ones(1)}, {}, step=1)
    (good / "model.safetensors").rename(good / "m.bak")
    with pytest.raises(CheckpointError, match=r"not a finelap checkpoint: missing model\.safetensors$"):
        load_checkpoint(good)
    (good / "m.bak").rename(good / "model.safetensors")

    meta = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(CheckpointError, match=re.escape("checkpoint format 3 is newer than this finelap (supports <=1); upgrade finelap")):
        load_checkpoint(good)
    (good / "config.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "format_version"}))
    with pytest.raises(CheckpointError, match="no integer format_version"):
        load_checkpoint(good)
    (good / "config.json").write_text('{"format_version": 1,\n "step": ')
    with pytest.raises(CheckpointError, match=r"config\.json: corrupt JSON \(line 2"):
        load_checkpoint(good)
    (good / "config.json").write_text(json.dumps(meta))

    (good / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors file"):
        load_checkpoint(good)
    save_checkpoint(good, {"w": torch.ones(1)}, {}, step=1)  # replaces the damaged directory
    (good / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint: optimizer\.safetensors is missing"):
        load_checkpoint(good)
    assert load_checkpoint(good, training_state=False).step == 1  # inference does not need it


def test_restore_mismatched_or_missing_optimizer(tmp_path: Path) -> None:
    model, opt, _ = make_run(0)
    save_checkpoint(tmp_path / "c", model, {}, step=0, optimizer=opt, rng=False)
    ckpt = load_checkpoint(tmp_path / "c")
    other = torch.optim.AdamW([{"params": [model.net[0].weight]}, {"params": [model.net[0].bias]}])
    with pytest.raises(CheckpointError, match="does not match this optimizer"):
        restore_optimizer(other, ckpt.optimizer_state)
    with pytest.raises(CheckpointError, match="no RNG state"):
        restore_rng(ckpt.rng_state)
    save_checkpoint(tmp_path / "d", model, {}, step=0, rng=False)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        restore_optimizer(opt, load_checkpoint(tmp_path / "d").optimizer_state)


def test_unsupported_state_is_rejected_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"cannot store object at 'trainer\.fn'"):
        save_checkpoint(tmp_path / "c", {"w": torch.ones(1)}, {}, step=0, trainer_state={"fn": object()})
    with pytest.raises(ValueError, match="extra_json name 'config'"):
        save_checkpoint(tmp_path / "c", {"w": torch.ones(1)}, {}, step=0, extra_json={"config": {}})
    assert not tmp_path.joinpath("c").exists() and list(tmp_path.iterdir()) == []


class _Payload:
    """Unpickling this runs code: it creates `marker` (the attack a pickled checkpoint allows)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_weight_files_are_refused_without_running_them(tmp_path: Path) -> None:
    """A checkpoint whose weight files are pickles (torch.save output, e.g. a .pt renamed to
    .safetensors) is refused with a one-line error naming the file, and its payload never runs."""
    marker = tmp_path / "PAYLOAD_RAN"
    good = save_checkpoint(tmp_path / "c", TinyMLP(), {}, step=3, optimizer=torch.optim.SGD(TinyMLP().parameters(), lr=0.1))
    for name in ("model.safetensors", "optimizer.safetensors", "ema.safetensors"):
        bad = tmp_path / f"bad_{name.split('.')[0]}"
        bad.mkdir()
        for f in good.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        torch.save({"net.0.weight": torch.zeros(16, 6), "evil": _Payload(marker)}, bad / name)
        with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: corrupt safetensors file"):
            load_checkpoint(bad)
    assert not marker.exists()
    # control, read without unpickling: the file really carries the call that creates the marker
    import pickletools
    import zipfile

    with zipfile.ZipFile(tmp_path / "bad_model" / "model.safetensors") as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    args = {str(arg) for _, arg, _ in pickletools.genops(pkl) if arg is not None}
    assert {"pathlib Path", "touch", marker.name} <= args  # getattr(Path, "touch")(<...>/PAYLOAD_RAN)
    # a directory holding only the usual PyTorch pickles is not a checkpoint
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((good / "config.json").read_text())
    torch.save(TinyMLP().state_dict(), legacy / "pytorch_model.bin")
    torch.save(TinyMLP().state_dict(), legacy / "model.pt")
    with pytest.raises(CheckpointError, match=r"not a finelap checkpoint: missing model\.safetensors$"):
        load_checkpoint(legacy)


def test_save_and_load_never_use_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every pickle / torch serialisation entry point made to fail, a full checkpoint (weights,
    EMA, optimizer, scheduler, RNG, trainer extras) still saves and loads back exactly."""
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint must never be (un)pickled")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "dump"), (pickle, "dumps"), (pickle, "Unpickler"),
                      (pickle, "Pickler"), (torch, "load"), (torch, "save")):  # fmt: skip
        monkeypatch.setattr(mod, name, forbidden)
    seed_all(0)
    model, opt, sched = make_run(0)
    train_steps(model, opt, sched, 2)
    ema = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path / "c", model, {"name": "x"}, step=2, optimizer=opt, scheduler=sched, ema_state=ema,
                           trainer_state={"epoch": 1, "seen": torch.arange(3)})  # fmt: skip
    back = load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict[k], v) and torch.equal(back.ema_state[k], ema[k]), k
    fresh, opt2, sched2 = make_run(1)
    assert restore_training_state(back, opt2, sched2) == 2
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert back.trainer_state["epoch"] == 1 and torch.equal(back.trainer_state["seen"], torch.arange(3))


def test_outputs_have_normal_permissions(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); results must get the usual mode."""
    import os
    import stat

    from finelap.train.checkpoint import save_checkpoint
    from finelap.utils import write_json_atomic

    umask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "r.json", {"a": 1})
        ck = save_checkpoint(tmp_path / "ck", {"w": torch.zeros(2)}, {"name": "x"}, step=0)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(ck.stat().st_mode) == 0o755
    assert stat.S_IMODE((ck / "model.safetensors").stat().st_mode) == 0o644


# ----------------------------------------------------------------------------- byte-identical files

_SAVE_SCRIPT = r"""
import sys, math, random
from pathlib import Path
import numpy as np, torch
from torch import nn
from finelap.train.checkpoint import save_checkpoint

out, reverse = Path(sys.argv[1]), sys.argv[2] == "reverse"
torch.manual_seed(0); np.random.seed(0); random.seed(0)
model = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 6))
model[2].weight = model[0].weight  # tied: stored once, recorded in the metadata as an alias
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
model(torch.randn(4, 6)).sum().backward(); opt.step(); sched.step()
cfg = {"name": "same", "preset": "x", "audio": {"sample_rate": 16000, "n_mels": 64}, "eval": {"prompt_template": "{}"}}
if reverse:  # the same config built in another order
    cfg = {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v) for k, v in reversed(list(cfg.items()))}
for i in range(3):
    random.seed(1); np.random.seed(1); torch.manual_seed(1)  # the same RNG state in every save
    save_checkpoint(out / f"c{i}", model, cfg, step=7, optimizer=opt, scheduler=sched, ema_state=model,
                    preprocessing={"frame_rate_hz": 25.0}, extra_json={"phrase_clusters": {"b": 1, "a": [2, 3]}},
                    trainer_state={"z": 1, "a": torch.ones(2)})
"""


def test_identical_weights_give_byte_identical_files_across_processes(tmp_path: Path) -> None:
    """Issue 10.9: safetensors kept its metadata in a hash map whose order changes per save and per
    process, so identical checkpoints hashed differently (and the search index took them for
    different models). Three saves in each of two processes must give the same bytes, file by file."""
    import hashlib
    import os
    import subprocess
    import sys

    src = Path(finelap.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    for tag in ("same", "reverse"):
        r = subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, str(tmp_path / tag), tag], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
    dirs = [tmp_path / tag / f"c{i}" for tag in ("same", "reverse") for i in range(3)]
    names = sorted(p.name for p in dirs[0].iterdir())
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "config.json", "trainer_state.json"} <= set(names)
    for name in names:
        digests = {hashlib.sha256((d / name).read_bytes()).hexdigest() for d in dirs}
        assert len(digests) == 1, f"{name}: {len(digests)} different files from 6 saves of the same state"
    ckpt = load_checkpoint(dirs[-1])  # and the rewritten header still loads, ties and all
    assert ckpt.step == 7 and torch.equal(ckpt.trainer_state["a"], torch.ones(2))


# ----------------------------------------------------------------------------- LATEST stays inside the run


def test_latest_cannot_point_outside_the_run_directory(tmp_path: Path) -> None:
    """Issue 10.6: LATEST containing '..' loaded the parent directory (here a valid checkpoint)."""
    save_checkpoint(tmp_path / "outside", {"w": torch.zeros(1)}, {}, step=99, rng=False)
    parent = tmp_path / "parent"
    save_checkpoint(parent, {"w": torch.zeros(1)}, {}, step=98, rng=False, update_latest=False)
    run = parent / "run"
    save_checkpoint(run / checkpoint_name(1), {"w": torch.ones(1)}, {}, step=1, rng=False)
    (run / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    for bad in ("..", "../outside", str(tmp_path / "outside"), "escape", "./.."):
        (run / "LATEST").write_text(bad + "\n")
        with pytest.raises(CheckpointError, match=r"LATEST: names .* not a checkpoint folder inside .*refusing"):
            load_checkpoint(run)
        with pytest.raises(CheckpointError, match="refusing"):
            latest_checkpoint(run)
    (run / "LATEST").write_bytes(b"\xff\xfe step")
    with pytest.raises(CheckpointError, match="LATEST file"):
        load_checkpoint(run)
    (run / "LATEST").write_text("step-00000001\n")
    assert load_checkpoint(run).step == 1


# ----------------------------------------------------------------------------- leftovers of killed saves

_KILL_SCRIPT = r"""
import os, sys
from pathlib import Path
import torch
from finelap import checkpoint as ck  # the file I/O (monkeypatched below) lives here

run, mode = Path(sys.argv[1]), sys.argv[2]
die = lambda *a, **k: os._exit(9)  # as a kill -9 would, without cleanup
if mode == "writing":  # killed while writing: a half-written temp dir is left
    ck._write_json = die
    ck.save_checkpoint(run / "step-00000002", {"w": torch.ones(2)}, {}, step=2, rng=False)
elif mode == "swapping":  # killed between the two renames of an overwrite: only the backup exists
    ck.save_checkpoint(run / "final", {"w": torch.ones(2)}, {}, step=1, rng=False)
    real, calls = os.rename, []
    def rename(a, b):
        real(a, b); calls.append(b)
        if len(calls) == 1: os._exit(9)
    ck.os.rename = rename
    ck.save_checkpoint(run / "final", {"w": torch.zeros(2)}, {}, step=2, rng=False)
elif mode == "cleaning":  # killed after the swap, before deleting the old copy
    ck.save_checkpoint(run / "best", {"w": torch.ones(2)}, {}, step=1, rng=False)
    ck._remove_dir = die
    ck.save_checkpoint(run / "best", {"w": torch.zeros(2)}, {}, step=3, rng=False)
"""


def test_leftovers_of_killed_saves_are_swept_by_the_next_save(tmp_path: Path) -> None:
    """Issue 10.8: `.step-N.tmp-*` / `.final.old-*` folders of killed saves stayed forever, since
    only a later save of the *same* name looked at them. The next save of any name cleans those
    that are provably stale (made here by a process that has exited) and keeps everything else."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    src = Path(finelap.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    modes = ("writing", "swapping", "cleaning")
    # one folder each (a save in one would already sweep the others' leftovers), merged afterwards
    procs = [subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path / m), m], env=env, stderr=subprocess.PIPE, text=True)
             for m in modes]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 9, err[-2000:]
    for m in modes:
        for p in (tmp_path / m).iterdir():
            if p.name != "LATEST":
                p.rename(run / p.name)
    hidden = lambda: sorted(p.name for p in run.iterdir() if p.name.startswith("."))  # noqa: E731
    left = hidden()
    assert any(n.startswith(".step-00000002.tmp-") for n in left), left
    assert any(n.startswith(".final.old-") for n in left) and not (run / "final").exists(), left
    assert any(n.startswith(".best.old-") for n in left), left

    # what must survive: a save in progress in a live process, an older finelap's unowned temp dir,
    # and hidden folders that are not ours
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        # named as this host's saves name their temp dirs, with the live process as owner
        host = next((m[1] for n in left if (m := re.match(r"^\.step-00000002\.tmp-([0-9a-f]{8})-\d+-", n))), "00000000")
        live_tmp = run / f".step-00000007.tmp-{host}-{live.pid}-abcd1234"
        live_tmp.mkdir()
        (run / ".step-00000008.tmp-zq3x_9ab").mkdir()
        (run / ".cache").mkdir()
        save_checkpoint(run / "step-00000003", {"w": torch.ones(2)}, {}, step=3, rng=False)
        assert hidden() == sorted([live_tmp.name, ".step-00000008.tmp-zq3x_9ab", ".cache"])
    finally:
        live.kill()
        live.wait()
    assert load_checkpoint(run / "final").step == 1  # the interrupted overwrite is rolled back
    assert load_checkpoint(run / "best").step == 3  # the finished one is kept
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003"]
    # once its owner has exited, the live one is stale too
    save_checkpoint(run / "step-00000004", {"w": torch.ones(2)}, {}, step=4, rng=False)
    assert hidden() == sorted([".step-00000008.tmp-zq3x_9ab", ".cache"])
