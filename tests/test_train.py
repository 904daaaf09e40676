from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finelap.config import load_run_config
from finelap.data.batching import ClipDataset, Collate, MixedBatchSampler, split_by_supervision
from finelap.data.manifests import read_manifest
from finelap.losses.compose import LossConfig
from finelap.models.build import build_model
from finelap.train.loop import build_clusters, forward_backward, lr_lambda, train

from tinyfactory import tiny_dataset, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def test_lr_schedule_hand_values():
    assert lr_lambda(0, 4, 10, "cosine", 0.0) == pytest.approx(0.25)
    assert lr_lambda(3, 4, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_lambda(4, 4, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_lambda(7, 4, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_lambda(10, 4, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_lambda(7, 4, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_lambda(9, 4, 10, "constant", 0.0) == 1.0


def _setup(tmp_path, preset="finelap", n=16, **extra):
    man = tiny_dataset(tmp_path / "data", n=n)
    cfg = load_run_config(REPO / "configs" / f"{preset}.yaml", tiny_overrides(tmp_path, man, **extra))
    return cfg, man


def _batch(cfg, model, clips, clusters, size, step=0):
    ds = ClipDataset(clips, 16000, cfg.audio.clip_seconds, clusters=clusters, phrases_per_clip=cfg.data.phrases_per_clip)
    s = MixedBatchSampler(split_by_supervision(clips), cfg.data.mix, size, seed=1)
    return Collate(model.timeline, cfg.data.phrases_per_clip)([ds[k] for k in s.batch_keys(step)])


@pytest.mark.parametrize("preset", ["finelap", "clap"])
def test_accumulation_equals_one_big_batch(tmp_path, preset):
    """GradCache: 4 micro-batches of 4 give the gradients of one batch of 16 (issue: 4x8 == 32)."""
    torch.manual_seed(0)
    cfg, man = _setup(tmp_path, preset, n=16)
    clips = read_manifest(man)
    model = build_model(cfg)
    clusters = build_clusters(model, clips, cfg)
    batch = _batch(cfg, model, clips, clusters, 16)
    loss_cfg = cfg.loss
    m1, m4 = model, copy.deepcopy(model)
    full = forward_backward(m1, loss_cfg, batch, clusters, accum_steps=1)
    acc = forward_backward(m4, loss_cfg, batch, clusters, accum_steps=4)
    assert full.keys() == acc.keys()
    for k in full:
        assert acc[k] == pytest.approx(full[k], rel=1e-5, abs=1e-6), k
    n_grads = 0
    for (name, p1), (_, p4) in zip(m1.named_parameters(), m4.named_parameters()):
        if p1.grad is None:
            assert p4.grad is None, name
            continue
        n_grads += 1
        torch.testing.assert_close(p4.grad, p1.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert n_grads > 10
    if preset == "finelap":
        assert "frame/sigmoid" in full


@pytest.mark.parametrize("preset", ["finelap", "flam"])
def test_frame_head_on_labelled_clips_only_gives_the_same_step(tmp_path, preset, monkeypatch):
    """The frame losses read only clips with strong labels, so the trainer runs the frame head on
    those rows only: same loss terms and gradients as running it on every clip, fewer rows."""
    import finelap.train.loop as L
    from finelap.losses.compose import frame_rows_needed

    torch.manual_seed(0)
    cfg, man = _setup(tmp_path, preset, n=16)
    clips = read_manifest(man)
    model = build_model(cfg)
    clusters = build_clusters(model, clips, cfg)
    batch = _batch(cfg, model, clips, clusters, 16)
    assert frame_rows_needed(cfg.loss) == "labelled"
    n_lab = int(batch.has_frames.sum())
    assert 0 < n_lab < batch.size  # a mixed batch, so some rows are skipped
    m_all = copy.deepcopy(model)
    seen: list[int] = []
    head = model.frame_head
    orig = head.forward
    monkeypatch.setattr(head, "forward", lambda x, m=None: (seen.append(x.shape[0]), orig(x, m))[1])
    part = forward_backward(model, cfg.loss, batch, clusters)
    assert seen == [n_lab]
    monkeypatch.setattr(L, "_frame_rows", lambda loss_cfg, b: None)
    full = forward_backward(m_all, cfg.loss, batch, clusters)
    assert part.keys() == full.keys() and any(k.startswith("frame/") for k in full)
    for k in full:
        assert part[k] == pytest.approx(full[k], rel=1e-5, abs=1e-6), k
    for (name, p1), (_, p2) in zip(model.named_parameters(), m_all.named_parameters()):
        if p2.grad is None:
            assert p1.grad is None, name
            continue
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_encode_audio_frame_rows(tmp_path):
    """frame_rows: the chosen rows equal a full pass, the others are zeros; no rows at all works."""
    torch.manual_seed(0)
    cfg, _ = _setup(tmp_path, "finelap", n=4)
    model = build_model(cfg).eval()
    wave = torch.randn(3, 16000) * 0.1
    lengths = torch.tensor([16000, 12000, 8000])
    with torch.no_grad():
        full = model.encode_audio(wave, lengths)
        some = model.encode_audio(wave, lengths, frame_rows=torch.tensor([False, True, False]))
        none = model.encode_audio(wave, lengths, frame_rows=torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(some.frame_embeds[1], full.frame_embeds[1], rtol=1e-5, atol=1e-6)
    assert some.frame_embeds[[0, 2]].abs().sum() == 0 and none.frame_embeds.abs().sum() == 0
    torch.testing.assert_close(some.audio_embeds, full.audio_embeds)
    assert none.frame_embeds.shape == full.frame_embeds.shape


def test_resume_is_bitwise_identical(tmp_path):
    cfg, _ = _setup(tmp_path, out="straight")
    final_a = train(cfg, progress=False)
    cfg_b, _ = _setup(tmp_path, out="resumed")
    mid = train(cfg_b, progress=False, stop_after=2)
    assert mid.name == "step-00000002"
    final_b = train(cfg_b, resume=True, progress=False)
    a, b = load_file(final_a / "model.safetensors"), load_file(final_b / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = load_file(final_a / "optimizer.safetensors"), load_file(final_b / "optimizer.safetensors")
    for k in oa:
        if "rng" not in k:
            assert torch.equal(oa[k], ob[k]), k
    # the metrics log continues instead of duplicating steps
    import csv

    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "resumed" / "metrics.csv"))]
    assert steps == [1, 2, 3, 4]


def test_checkpoints_leave_out_the_frozen_bundled_text_tower(tmp_path):
    """The bundled all-MiniLM-L6-v2 ships with every install: a frozen one is not stored (the
    checkpoint shrinks ~10x), resume is still bitwise, and loading restores the package's weights."""
    from finelap.models.build import checkpoint_state, load_pretrained

    extra = {"model.text.path": "null", "train.ema_decay": "0.9"}
    cfg, _ = _setup(tmp_path, out="straight", **extra)
    final_a = train(cfg, progress=False)
    cfg_b, _ = _setup(tmp_path, out="resumed", **extra)
    train(cfg_b, progress=False, stop_after=2)
    final_b = train(cfg_b, resume=True, progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(final_a / name), load_file(final_b / name)
        assert a and not [k for k in a if k.startswith("text.model.")], name
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (final_a / "model.safetensors").stat().st_size < 10e6  # the tower alone is ~90 MB

    fresh = build_model(cfg)
    model, _, _ = load_pretrained(final_a)
    loaded, ref, stored = model.state_dict(), fresh.state_dict(), load_file(final_a / "ema.safetensors")
    text_keys = [k for k in ref if k.startswith("text.model.")]
    assert text_keys and all(torch.equal(loaded[k], ref[k]) for k in text_keys)
    assert all(torch.equal(loaded[k], stored[k]) for k in stored)  # use_ema=True: the EMA weights
    # a tower that trains (or is not the bundled one) is always stored
    fresh.text.unfreeze()
    assert set(text_keys) <= set(checkpoint_state(fresh))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    man = tiny_dataset(tmp_path / "data", n=8)
    ov = tiny_overrides(tmp_path, man, out="sig")
    ov = [o for o in ov if not o.startswith("train.max_steps")] + ["train.max_steps=100000"]
    env = {**os.environ, "FINELAP_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "finelap.cli", "train", "--config", str(REPO / "configs" / "finelap.yaml"), *ov],
                            env=env, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "sig" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM" in err
    latest = (tmp_path / "sig" / "LATEST").read_text().strip()
    assert latest.startswith("step-") and (tmp_path / "sig" / latest / "model.safetensors").exists()


def test_bad_file_in_training_data_is_skipped(tmp_path):
    cfg, man = _setup(tmp_path, n=8)
    bad = man.parent / "clip001.wav"
    bad.write_bytes(b"RIFF garbage")
    final = train(cfg, progress=False)
    assert (final / "model.safetensors").exists()
    skipped = (Path(cfg.train.out_dir) / "skipped_files.txt").read_text()
    assert "clip001.wav" in skipped


def test_two_process_gradients_equal_one_process(tmp_path):
    """Loss gathers features with gradients across 2 gloo ranks; averaged gradients equal the
    single-process gradients of the same global batch."""
    cfg, man = _setup(tmp_path, n=16)
    script = REPO / "tests" / "_ddp_worker.py"
    out = tmp_path / "ddp"
    out.mkdir()
    # this checkout's sources first, so the workers test the code under test (not an installed copy)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path), str(man), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), str(tmp_path), str(man), str(out)], env=env,
                            capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    g2, g1 = load_file(out / "grads_ws2.safetensors"), load_file(out / "grads_ws1.safetensors")
    assert g1.keys() == g2.keys() and len(g1) > 10
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)
    l1, l2 = (out / "loss_ws1.txt").read_text(), (out / "loss_ws2.txt").read_text()
    assert math.isclose(float(l1), float(l2), rel_tol=1e-5)


def test_step_texts_prompts_phrases_like_inference_and_keeps_captions():
    """Frame-level phrases are encoded as the prompts detect/ground/eval use; captions as written."""
    import torch

    from finelap.data.batching import Batch
    from finelap.scoring import make_prompt
    from finelap.train.loop import step_texts

    b = Batch.__new__(Batch)
    b.captions = ["a dog barks", ""]
    b.phrases = [["dog_barking", "rain"], ["rain", ""]]
    st = step_texts(b, None, "the sound of {}")
    assert st.texts[int(st.caption_index[0])] == "a dog barks"
    assert [st.texts[int(i)] for i in st.phrase_index[0]] == [make_prompt("the sound of {}", "dog_barking"), "the sound of rain"]
    assert int(st.phrase_index[1, 0]) == int(st.phrase_index[0, 1])  # one text, one slot
    assert sorted(st.texts[int(i)] for i in st.flam_index) == ["the sound of dog barking", "the sound of rain"]
    plain = step_texts(b, None)
    assert [plain.texts[int(i)] for i in plain.phrase_index[0]] == ["dog_barking", "rain"]
    assert isinstance(st.phrase_index, torch.Tensor)


def test_resume_is_bitwise_identical_with_dropout(tmp_path):
    """Dropout draws from the global torch RNG every step: the resumed run must continue that
    stream exactly where the interrupted one left it (creating the DataLoader iterator also draws
    a seed from it, so the restore has to come after that)."""
    extra = {"model.dropout": "0.1", "train.max_steps": "6"}
    cfg, _ = _setup(tmp_path, out="straight", **extra)
    final_a = train(cfg, progress=False)
    cfg_b, _ = _setup(tmp_path, out="resumed", **extra)
    train(cfg_b, progress=False, stop_after=3)
    final_b = train(cfg_b, resume=True, progress=False)
    a, b = load_file(final_a / "model.safetensors"), load_file(final_b / "model.safetensors")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ after resume, e.g. {differ[:3]}"
    # and dropout really is on: without it the same run ends elsewhere
    cfg_c, _ = _setup(tmp_path, out="nodrop", **{**extra, "model.dropout": "0.0"})
    c = load_file(train(cfg_c, progress=False) / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_signal_during_the_last_step_still_returns_a_checkpoint(tmp_path, monkeypatch):
    """A SIGTERM in the last step used to return step-N (never saved: only steps before the last
    save one); the run must end normally with `final`."""
    import finelap.train.loop as loop

    cfg, _ = _setup(tmp_path, **{"train.max_steps": "2"})
    real, calls = loop.forward_backward, []

    def signalling(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # inside the last step
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(loop, "forward_backward", signalling)
    out = train(cfg, progress=False)
    assert out.name == "final" and (out / "model.safetensors").is_file()


def test_train_lr_mult_reaches_the_optimizer(tmp_path):
    """train.lr_mult is read: a prefix with multiplier 0 is left out of the optimizer (those weights
    keep their initial values through training) while the other heads train."""
    cfg, _ = _setup(tmp_path, **{"train.lr_mult": "{clip_head: 0.0}", "train.max_steps": "2"})
    assert cfg.train.lr_mult == {"clip_head": 0.0}
    torch.manual_seed(cfg.train.seed)  # as the loop does before building the model
    start = build_model(cfg).state_dict()
    final = load_file(train(cfg, progress=False) / "model.safetensors")
    clip = [k for k in start if k.startswith("clip_head.")]
    assert clip and all(torch.equal(final[k], start[k]) for k in clip)
    assert not torch.equal(final["text_head.mlp.0.weight"], start["text_head.mlp.0.weight"])
