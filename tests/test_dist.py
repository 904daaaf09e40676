"""2-process gloo runs equal 1-process runs on the same global batch.

Convention under test (finelap.dist): with the global batch split over ranks (here
unequally, 3 + 2 clips, as when a clip fails to load on one rank),

  * mean_r loss_r                      == the single-process loss,
  * grad_r(local inputs) / world_size  == the single-process gradient of those rows,
  * mean_r grad_r(replicated scalars)  == the single-process gradient,

which is exactly what DDP's gradient averaging needs; the last case wraps a tiny model in
DistributedDataParallel and compares its averaged parameter gradients directly.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from finelap.losses import (
    FLAMLoss,
    FrameLabels,
    LossConfig,
    LossInputs,
    caption_loss,
    compute_losses,
    finelap_frame_loss,
    flam_frame_loss,
    hard_negative_info_nce,
    info_nce,
    masked_distill_loss,
    sigmoid_loss,
)
from finelap import dist as fdist
from finelap.losses.frame_infonce import frame_info_nce

WORLD = 2
ROWS = [slice(0, 3), slice(3, 5)]  # audio clips per rank
TEXT_ROWS = [slice(0, 4), slice(4, 6)]  # FLAM texts per rank
T, K, D, N_TEXT, C = 4, 3, 4, 6, 3


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    fm = torch.ones(5, T, dtype=torch.bool)
    fm[1, 2:] = False
    fm[4, 3:] = False
    pm = torch.ones(5, K, dtype=torch.bool)
    pm[3, 2] = False
    return {
        "audio": n(5, D), "text": n(5, D), "groups": torch.tensor([0, 1, 0, 2, 1]),
        "scale": torch.tensor(6.0, dtype=torch.float64), "bias": torch.tensor(-2.0, dtype=torch.float64),
        "frames": n(5, T, D), "frame_mask": fm, "phrases": n(5, K, D), "phrase_mask": pm,
        "targets": (torch.rand(5, T, K, generator=g) > 0.5).double(),
        "has_frames": torch.tensor([True, False, True, True, True]),
        "flam_text": n(N_TEXT, D),
        "alpha": torch.rand(N_TEXT, generator=g, dtype=torch.float64) * 5 + 5,
        "beta": torch.rand(N_TEXT, generator=g, dtype=torch.float64) * 2 - 4,
        "activity": torch.rand(5, T, C, generator=g) > 0.5,
        "text_cluster": torch.tensor([0, 2, 1, 0, -1, 2]),
        "student": torch.randn(5, T, D, generator=g, dtype=torch.float64),
        "teacher": torch.randn(5, T, D, generator=g, dtype=torch.float64),
        "distill_mask": torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1], [0, 1, 0, 0], [1, 1, 0, 1]], dtype=torch.bool),
        "cap_logits": torch.randn(5, 3, 6, generator=g, dtype=torch.float64),
        "cap_targets": torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 1], [2, 2, 2], [0, 0, 0]]),
    }  # fmt: skip


def _cases(d: dict, rank: int, world: int, rows: slice, trows: slice) -> dict[str, dict]:
    """Every loss on this process's share; returns {case: {"loss": float, "grads": {leaf: (kind, grad)}}}."""

    def leaf(name: str, sl: slice | None = None) -> torch.Tensor:
        x = d[name] if sl is None else d[name][sl]
        return x.clone().requires_grad_()

    out: dict[str, dict] = {}

    def record(case: str, loss: torch.Tensor, leaves: dict[str, tuple[str, torch.Tensor]]) -> None:
        grads = torch.autograd.grad(loss, [t for _, t in leaves.values()], retain_graph=True, allow_unused=True)
        out[case] = {
            "loss": loss.item(),
            "grads": {k: (kind, torch.zeros_like(t) if g is None else g) for (k, (kind, t)), g in zip(leaves.items(), grads)},
        }

    def clip_leaves():
        return {"audio": ("rows", leaf("audio", rows)), "text": ("rows", leaf("text", rows)), "scale": ("rep", leaf("scale")), "bias": ("rep", leaf("bias"))}

    groups = d["groups"][rows]
    lv = clip_leaves()
    a, t, s, b = (lv[k][1] for k in ("audio", "text", "scale", "bias"))
    record("infonce", info_nce(a, t, s, rank, world), lv)
    record("infonce_local", info_nce(a, t, s, rank, world, local_loss=True), lv)
    record("infonce_groups", info_nce(a, t, s, rank, world, groups=groups), lv)
    record("sigmoid", sigmoid_loss(a, t, s, b, rank, world, groups=groups), lv)
    record("sigmoid_chunked", sigmoid_loss(a, t, s, b, rank, world, groups=groups, chunk_size=2), lv)
    record("hard_negative", hard_negative_info_nce(a, t, s, 0.15, rank, world, groups=groups), lv)

    f, p = leaf("frames", rows), leaf("phrases", rows)
    fs, fb = leaf("scale"), leaf("bias")
    fl = {"frames": ("rows", f), "phrases": ("rows", p), "scale": ("rep", fs), "bias": ("rep", fb)}
    args = (f, d["frame_mask"][rows], p, d["targets"][rows], d["phrase_mask"][rows], d["has_frames"][rows], fs, fb)
    record("finelap_chunked", finelap_frame_loss(*args, chunk_size=2, rank=rank, world_size=world), fl)
    record("finelap_full", finelap_frame_loss(*args, rank=rank, world_size=world), fl)
    record("frame_infonce", frame_info_nce(*args, rank=rank, world_size=world), fl)

    f = leaf("frames", rows)
    te, al, be = leaf("flam_text", trows), leaf("alpha", trows), leaf("beta", trows)
    flv = {"frames": ("rows", f), "flam_text": ("text_rows", te), "alpha": ("text_rows", al), "beta": ("text_rows", be)}
    labels = FrameLabels(d["activity"][rows], d["text_cluster"][trows])
    terms = FLAMLoss(chunk_size=2)(f, d["frame_mask"][rows], te, al, be, labels, d["has_frames"][rows], rank, world)
    record("flam_frame", terms["frame/flam"], flv)
    record("flam_prior", terms["frame/prior"], flv)
    dense = torch.stack([d["activity"][:, :, max(int(c), 0)].double() * (int(c) >= 0) for c in d["text_cluster"]], -1)[rows]
    record("flam_dense_full", flam_frame_loss(f, d["frame_mask"][rows], te, al, be, dense, None, None, rank, world), flv)

    st = leaf("student", rows)
    record("distill", masked_distill_loss(st, d["teacher"][rows], d["distill_mask"][rows], world_size=world), {"student": ("rows", st)})
    cl = leaf("cap_logits", rows)
    record("caption", caption_loss(cl, d["cap_targets"][rows], 0, 0.1, world), {"cap_logits": ("rows", cl)})

    # the composer, with strong labels only on rank 0: rank 1 has no frame targets at all
    a, f, s = leaf("audio", rows), leaf("frames", rows), leaf("scale")
    x = LossInputs(
        audio_embeds=a, text_embeds=d["text"][rows], logit_scale=s, logit_bias=d["bias"],
        caption_groups=groups, frame_embeds=f, frame_mask=d["frame_mask"][rows],
        frame_logit_scale=d["scale"], frame_logit_bias=d["bias"],
    )  # fmt: skip
    has = d["has_frames"].clone()
    has[3:] = False
    if world == 1 or rank == 0:
        x.phrase_embeds, x.phrase_mask = d["phrases"][rows], d["phrase_mask"][rows]
        x.frame_targets, x.has_frames = d["targets"][rows], has[rows]
    res = compute_losses(LossConfig(clip="sigmoid", frame="finelap", frame_chunk_size=2), x, rank, world)
    cl = {"audio": ("rows", a), "frames": ("rows", f), "scale": ("rep", s)}
    for term in ("clip/sigmoid", "frame/sigmoid", "loss"):
        record("compose " + term, res[term], cl)
    # a frame objective added as one file (losses/frame_infonce.py): the same DDP rule
    res = compute_losses(LossConfig(clip=None, frame="frame_infonce"), x, rank, world)
    record("compose frame/infonce", res["frame/infonce"], {"frames": ("rows", f)})
    return out


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.audio = torch.nn.Linear(3, D).double()
        self.text = torch.nn.Linear(3, D).double()
        self.log_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))

    def forward(self, xa, xt):
        return F.normalize(self.audio(xa), dim=-1), F.normalize(self.text(xt), dim=-1)


def _tiny_loss(model, xa, xt, rank, world):
    core = model.module if hasattr(model, "module") else model
    a, t = model(xa, xt)
    s = core.log_scale.exp()
    return info_nce(a, t, s, rank, world) + sigmoid_loss(a, t, s, core.bias, rank, world) + hard_negative_info_nce(a, t, s, 0.15, rank, world)


def _tiny_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    info = fdist.init_distributed(device="cpu", timeout_s=60, init_method=f"file://{init_file}")
    assert (info.rank, info.world_size, info.device.type, info.owns_group) == (rank, world, "cpu", True)
    clean = False
    assert dist.get_backend() == "gloo" and fdist.is_dist() and fdist.get_world_size() == world
    try:
        d = _data()
        res = _cases(d, rank, world, ROWS[rank], TEXT_ROWS[rank])
        # gather_with_grad on its own: concatenation in rank order; backward sums over ranks
        x = d["audio"][ROWS[rank]].clone().requires_grad_()
        y = fdist.gather_with_grad(x)
        (y * (rank + 1)).sum().backward()
        res["_gather"] = {"value": y.detach(), "grad": x.grad}
        res["_reduce"] = {"mean": fdist.all_reduce_mean(torch.tensor(float(rank))).item()}
        # stop flags: any rank's True counts on every rank
        res["_any"] = {"flags": fdist.any_rank([rank == 1, False, True, rank == 0])}
        # DDP: averaged parameter gradients equal the single-process ones
        model = torch.nn.parallel.DistributedDataParallel(_Tiny())
        xa, xt = _tiny_inputs()
        _tiny_loss(model, xa[ROWS[rank]], xt[ROWS[rank]], rank, world).backward()
        res["_ddp"] = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        fdist.barrier()
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        clean = True
    finally:
        # barrier then destroy (a bare destroy while the peer still writes can make gloo abort)
        fdist.shutdown_distributed(info, clean=clean)


def test_single_process_helpers(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = fdist.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert not fdist.is_dist() and fdist.get_rank() == 0 and fdist.get_world_size() == 1
    x = torch.ones(2, requires_grad=True)
    assert fdist.gather_with_grad(x) is x
    assert fdist.all_gather_sizes(7) == [7]
    assert fdist.all_reduce_mean(torch.tensor(3.0)).item() == 3.0
    assert fdist.any_rank([True, False]) == [True, False] and not info.owns_group
    fdist.shutdown_distributed(info)  # nothing to end: a no-op


def test_two_gloo_processes_equal_one_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    mp.spawn(_worker, args=(WORLD, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    ref = _cases(_data(), 0, 1, slice(0, 5), slice(0, N_TEXT))
    assert set(ref) == set(per_rank[0]) - {"_gather", "_reduce", "_ddp", "_any"}
    for case, want in ref.items():
        got = [pr[case] for pr in per_rank]
        assert sum(g["loss"] for g in got) / WORLD == pytest.approx(want["loss"], rel=1e-9, abs=1e-12), case
        for name, (kind, g_ref) in want["grads"].items():
            if kind == "rep":
                g = sum(r["grads"][name][1] for r in got) / WORLD
            else:
                g = torch.cat([r["grads"][name][1] for r in got]) / WORLD
            torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12, msg=f"{case}: gradient of {name}")
    # gather_with_grad alone: values in rank order, gradient = sum over ranks of (rank + 1) = 3
    audio = _data()["audio"]
    for r in range(WORLD):
        torch.testing.assert_close(per_rank[r]["_gather"]["value"], audio)
        torch.testing.assert_close(per_rank[r]["_gather"]["grad"], torch.full_like(audio[ROWS[r]], 3.0))
        assert per_rank[r]["_reduce"]["mean"] == pytest.approx(0.5)
        assert per_rank[r]["_any"]["flags"] == [True, False, True, True]
    # DDP end to end
    model = _Tiny()
    xa, xt = _tiny_inputs()
    _tiny_loss(model, xa, xt, 0, 1).backward()
    for n, p in model.named_parameters():
        for r in range(WORLD):
            torch.testing.assert_close(per_rank[r]["_ddp"][n], p.grad, rtol=1e-9, atol=1e-12, msg=f"DDP gradient of {n}")
