"""SLAP pieces: the caption decoder, masked-frame self-distillation inputs with an EMA teacher, and
`finelap caption`."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from finelap.models.build import load_pretrained, upgrade_checkpoint_config
import torch.nn.functional as F

from finelap.config import load_run_config
from finelap.errors import CheckpointError, ConfigError
from finelap.model_config import CaptionDecoderConfig
from finelap.losses.compose import LossConfig, LossInputs, compute_losses
from finelap.models.build import build_model
from finelap.models.decoder import CaptionDecoder, prepare_targets, special_token_ids
from finelap.train.checkpoint import save_checkpoint
from finelap.train.slap import (
    SLAPState,
    mask_generator,
    needs_decoder,
    sample_block_mask,
    slap_inputs,
    update_teacher,
)
from tinyfactory import TINY_CNN, tiny_text_dir

REPO = Path(__file__).resolve().parents[1]
SR = 16000


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    return tiny_text_dir(tmp_path_factory.mktemp("slap_text"))


@pytest.fixture(scope="module")
def tokenizer(text_dir):
    import transformers as T

    return T.AutoTokenizer.from_pretrained(str(text_dir), local_files_only=True)


def tiny_cfg(text_dir: Path, preset: str = "slap", *extra: str):
    ov = [
        f"model.audio={TINY_CNN}".replace("'", '"'),
        f"model.text.path={text_dir}",
        "model.text.freeze=true",
        "model.embed_dim=16",
        "model.frame_head_heads=2",
        "audio.clip_seconds=2.0",
        "audio.max_seconds=2.0",
        *extra,
    ]
    return load_run_config(REPO / "configs" / f"{preset}.yaml", ov)


def tiny_decoder(vocab: int = 27, **kw) -> CaptionDecoder:
    torch.manual_seed(0)
    opts = dict(dim=32, layers=2, heads=2, max_len=8, bos_id=2, eos_id=3, pad_id=0)
    opts.update(kw)
    return CaptionDecoder(12, vocab, **opts)


# ============================================================================ decoder


def test_prepare_targets_by_hand(tokenizer):
    # vocab ids (tests/tinyfactory.WORDS): [PAD]=0 [CLS]=2 [SEP]=3 the=5 sound=6 of=7 a=8 dog=9 barking=10 rain=13
    assert special_token_ids(tokenizer) == (2, 3, 0)
    inputs, targets = prepare_targets(tokenizer, ["a dog barking", "", "the sound of rain falling"], max_len=5)
    assert inputs.tolist() == [[2, 8, 9, 10, 0], [0, 0, 0, 0, 0], [2, 5, 6, 7, 13]]
    assert targets.tolist() == [[8, 9, 10, 3, 0], [0, 0, 0, 0, 0], [5, 6, 7, 13, 3]]  # truncated to 4 words + EOS
    inputs, targets = prepare_targets(tokenizer, ["", ""], max_len=5)  # no caption at all: one all-pad column
    assert inputs.tolist() == [[0], [0]] and targets.tolist() == [[0], [0]]


def test_decoder_teacher_forcing_shapes_and_memory_mask():
    dec = tiny_decoder().eval()
    mem = torch.randn(3, 10, 12)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2] = False  # a clip without valid frames must not give NaN
    tokens = torch.randint(4, 27, (3, 5))
    logits = dec(mem, mask, tokens)
    assert logits.shape == (3, 5, 27) and torch.isfinite(logits).all()
    # padded frames are invisible: changing them changes nothing
    mem2 = mem.clone()
    mem2[1, 6:] = 100.0
    torch.testing.assert_close(dec(mem2, mask, tokens)[1], logits[1])
    # ... while valid frames matter
    mem2[0, 0] += 1.0
    assert not torch.allclose(dec(mem2, mask, tokens)[0], logits[0])
    with pytest.raises(ValueError, match="max_len"):
        dec(mem, mask, torch.zeros(3, 9, dtype=torch.long))


def test_decoder_is_causal():
    dec = tiny_decoder().eval()
    mem = torch.randn(2, 7, 12)
    tokens = torch.randint(4, 27, (2, 6))
    ref = dec(mem, None, tokens)
    for j in range(6):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] - 4 + 1) % 23 + 4
        out = dec(mem, None, changed)
        torch.testing.assert_close(out[:, :j], ref[:, :j])  # earlier positions never see token j
        assert not torch.allclose(out[:, j:], ref[:, j:])


def test_decoder_arch_buffer_rebuilds():
    dec = tiny_decoder(max_len=6, eos_id=4)
    again = CaptionDecoder.from_state_dict(dec.state_dict())
    again.load_state_dict(dec.state_dict())
    assert (again.dim, again.layers, again.heads, again.max_len, again.eos_id) == (32, 2, 2, 6, 4)
    mem, tokens = torch.randn(1, 5, 12), torch.randint(4, 27, (1, 4))
    torch.testing.assert_close(again.eval()(mem, None, tokens), dec.eval()(mem, None, tokens))


def test_decoder_overfits_two_captions_and_generates_them(tokenizer):
    torch.manual_seed(0)
    v = len(tokenizer)
    bos, eos, pad = special_token_ids(tokenizer)
    dec = CaptionDecoder(12, v, dim=32, layers=2, heads=2, max_len=8, bos_id=bos, eos_id=eos, pad_id=pad)
    captions = ["a dog barking", "rain falling and a low tone"]
    mem = torch.randn(2, 6, 12)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    inputs, targets = prepare_targets(tokenizer, captions, dec.max_len)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    for step in range(200):
        loss = F.cross_entropy(dec(mem, mask, inputs).reshape(-1, v), targets.reshape(-1), ignore_index=pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05, f"did not overfit in {step + 1} steps (loss {loss.item():.3f})"
    want = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions]
    assert dec.generate(mem, mask, max_len=8, beam_size=1) == want
    assert dec.generate(mem, mask, max_len=8, beam_size=3) == want
    assert [tokenizer.decode(ids) for ids in want] == captions
    assert dec.training  # generate restores the mode


def test_incremental_decoding_equals_full_decode():
    """Generation feeds one token per step with cached memory keys/values (shared by beams) and
    cached self-attention inputs; its logits equal the full `decode` of the same prefix."""
    dec = tiny_decoder().eval()
    torch.manual_seed(2)
    mem = torch.randn(2, 9, 12) * 3
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    tokens = torch.randint(4, 27, (2, 7))
    tokens[:, 0] = dec.bos_id
    with torch.no_grad():
        enc, kp = dec.encode_memory(mem, mask)
        state = dec._start(enc, kp)
        full = dec.decode(tokens, enc, kp)
        for pos in range(tokens.shape[1]):  # one row per memory (greedy)
            torch.testing.assert_close(dec._step(tokens[:, pos], pos, state), full[:, pos], atol=1e-5, rtol=1e-5)
        # beams: three rows on one memory row, reordered between steps like beam search does
        state = dec._start(enc[1:], kp[1:])
        rows = tokens[[1, 1, 1]].clone()
        rows[1:, 2:] = torch.randint(4, 27, (2, 5))
        for pos in range(rows.shape[1]):
            got = dec._step(rows[:, pos], pos, state)
            want = dec.decode(rows[:, : pos + 1], enc[[1, 1, 1]], kp[[1, 1, 1]], last_only=True)[:, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            if pos == 3:  # swap beams: the caches follow their rows
                perm = torch.tensor([2, 0, 1])
                dec._reorder(state, perm)
                rows = rows[perm]


def test_beam_size_one_equals_greedy():
    dec = tiny_decoder().eval()
    torch.manual_seed(1)
    mem = torch.randn(6, 9, 12) * 3
    mask = torch.ones(6, 9, dtype=torch.bool)
    mem_enc, kp = dec.encode_memory(mem, mask)
    with torch.no_grad():
        greedy = dec._greedy(mem_enc, kp, 7, 1)
        beam1 = [dec._beam(mem_enc[i : i + 1], kp[i : i + 1], 7, 1, 1) for i in range(6)]
    assert greedy == beam1
    assert dec.generate(mem, mask, max_len=7, beam_size=1) == greedy
    # deterministic
    assert dec.generate(mem, mask, max_len=7, beam_size=3) == dec.generate(mem, mask, max_len=7, beam_size=3)


class _TableDecoder(CaptionDecoder):
    """A decoder whose next-token logits are a fixed random function of the prefix (a random
    "language model" tree), so that search quality can be checked against exhaustive search."""

    def __init__(self, vocab: int, seed: int, eos_bias: float) -> None:
        super().__init__(4, vocab, dim=8, layers=1, heads=2, max_len=8, bos_id=1, eos_id=2, pad_id=0)
        self.seed, self.eos_bias = seed, eos_bias

    def decode(self, tokens: torch.Tensor, mem: torch.Tensor, key_padding: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        out = torch.zeros(tokens.shape[0], tokens.shape[1], self.vocab_size)
        for i, row in enumerate(tokens.tolist()):
            g = torch.Generator().manual_seed(hash((self.seed, *row)) % (2**31))
            out[i, -1] = 2.0 * torch.randn(self.vocab_size, generator=g)
            out[i, -1, self.eos_id] += self.eos_bias
        return out

    def _next_logits(self, prefix: torch.Tensor, state) -> torch.Tensor:  # generation's hook: the same table
        return self.decode(prefix, None, None)[:, -1]


def _exhaustive(dec: CaptionDecoder, max_len: int) -> tuple[float, list[int]]:
    """Best sequence by length-normalised log-prob over every allowed sequence (naive reference)."""
    words = [t for t in range(dec.vocab_size) if t not in (dec.pad_id, dec.bos_id, dec.eos_id)]
    mem, kp = torch.zeros(1, 1, dec.dim), torch.zeros(1, 1, dtype=torch.bool)

    def logp(prefix: list[int]) -> torch.Tensor:
        return F.log_softmax(dec.decode(torch.tensor([[dec.bos_id, *prefix]]), mem, kp)[0, -1].float(), -1)

    best = (-math.inf, [])
    for n in range(1, max_len + 1):
        for seq in itertools.product(words, repeat=n):
            s = sum(float(logp(list(seq[:i]))[seq[i]]) for i in range(n))
            if n < max_len:  # ends with EOS
                cand = ((s + float(logp(list(seq))[dec.eos_id])) / (n + 1), list(seq))
            else:  # hit max_len without EOS
                cand = (s / n, list(seq))
            best = max(best, cand, key=lambda c: c[0])
    return best


def test_wide_beam_matches_exhaustive_search_and_beats_greedy():
    mem = torch.zeros(1, 3, 4)
    lengths, greedy_worse = set(), 0
    for seed in range(12):
        dec = _TableDecoder(6, seed, eos_bias=float(seed % 3) - 1.0).eval()
        score, seq = _exhaustive(dec, 4)
        assert dec.generate(mem, None, max_len=4, beam_size=200)[0] == seq, seed
        greedy = dec.generate(mem, None, max_len=4, beam_size=1)[0]
        greedy_worse += greedy != seq
        lengths.add(len(seq))
    assert len(lengths) > 1 and greedy_worse > 0  # the cases are not trivial


# ============================================================================ masks and teacher


def test_block_mask_ratio_validity_and_determinism():
    valid = torch.zeros(3, 40, dtype=torch.bool)
    valid[0, :40] = True
    valid[1, :23] = True
    valid[2, :1] = True
    m = sample_block_mask(valid, 0.5, 5, mask_generator(0, 7))
    assert m.dtype == torch.bool and m.shape == valid.shape
    assert not (m & ~valid).any()  # padded frames are never masked
    assert m.sum(1).tolist() == [20, 12, 1]  # floor(0.5 n + 0.5) per clip
    # blocks: masked runs have lengths that are sums of whole blocks (5) plus at most one remainder
    runs = [len(list(g)) for k, g in itertools.groupby(m[0].tolist()) if k]
    assert all(r % 5 == 0 for r in runs)
    torch.testing.assert_close(m, sample_block_mask(valid, 0.5, 5, mask_generator(0, 7)))
    assert not torch.equal(m, sample_block_mask(valid, 0.5, 5, mask_generator(0, 8)))
    assert not torch.equal(m, sample_block_mask(valid, 0.5, 5, mask_generator(0, 7, rank=1)))
    assert not torch.equal(m, sample_block_mask(valid, 0.5, 5, mask_generator(1, 7)))
    # every valid position can be masked; away from the clip's ends with probability about `ratio`
    # (the first/last frame is masked only when a block comes first/last: 3 blocks among 31 units)
    freq = torch.stack([sample_block_mask(valid[:1], 0.3, 4, mask_generator(0, s))[0] for s in range(400)]).float().mean(0)
    assert freq.mean().item() == pytest.approx(0.3, abs=0.01)
    assert freq.min().item() > 0.05 and freq[8:-8].min().item() > 0.2 and freq[8:-8].max().item() < 0.42


def test_teacher_ema_update_by_hand(text_dir):
    cfg = tiny_cfg(text_dir)
    model = build_model(cfg)
    state = SLAPState.create(model, cfg, decay=0.9)
    w_t = state.teacher.head.conv.weight
    w_s = model.audio.head.conv.weight
    assert not w_t.requires_grad and not state.teacher.training
    with torch.no_grad():
        w_t.fill_(1.0)
        w_s.fill_(3.0)
    state.update(model)
    torch.testing.assert_close(w_t, torch.full_like(w_t, 0.9 * 1.0 + 0.1 * 3.0))  # = 1.2
    state.update(model)
    torch.testing.assert_close(w_t, torch.full_like(w_t, 0.9 * 1.2 + 0.1 * 3.0))  # = 1.38
    # the same through the module-level helper; other parameters move by the same rule
    before = {k: v.clone() for k, v in state.teacher.named_parameters()}
    update_teacher(state.teacher, model, 0.5)
    for k, p in state.teacher.named_parameters():
        torch.testing.assert_close(p, 0.5 * before[k] + 0.5 * dict(model.audio.named_parameters())[k])
    # train() on the owner never puts the teacher in training mode
    model.train()
    assert not state.teacher.training


def test_model_builds_slap_modules_as_the_training_hook_did(text_dir):
    """The decoder and predictor are built last in FineLAPModel.__init__, as the training hook used
    to attach them right after build_model: the same seed gives the same weights as before."""
    import dataclasses

    from finelap.models.build import model_config_for
    from finelap.models.model import FineLAPModel
    from finelap.models.slap_modules import build_caption_decoder, build_slap_predictor

    cfg = tiny_cfg(text_dir)
    mc = model_config_for(cfg)
    torch.manual_seed(0)
    model = FineLAPModel(mc)
    torch.manual_seed(0)
    then = FineLAPModel(dataclasses.replace(mc, caption_decoder=None, slap_predictor=False))
    then.caption_decoder = build_caption_decoder(mc.caption_decoder, then.audio.dim, then.text.tokenizer)
    then.slap_predictor = build_slap_predictor(then.audio.dim)
    assert list(model.state_dict()) == list(then.state_dict())
    for k, v in then.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def _batch(seconds: list[float], captions: list[str], seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    n = int(max(seconds) * SR)
    lengths = torch.tensor([int(s * SR) for s in seconds])
    wave = torch.randn(len(seconds), n, generator=g) * 0.1
    wave = wave * (torch.arange(n)[None] < lengths[:, None])
    return SimpleNamespace(wave=wave, lengths=lengths, captions=captions)


def test_slap_inputs_shapes_gradients_and_determinism(text_dir):
    cfg = tiny_cfg(text_dir)
    assert needs_decoder(cfg)
    model = build_model(cfg).train()
    state = SLAPState.create(model, cfg)
    assert state.decay == 0.99 and (state.mask_ratio, state.mask_block) == (0.5, 5)  # train.slap's defaults
    batch = _batch([2.0, 1.3], ["a dog barking", ""])
    x = state.inputs(model, batch, step=5)
    t = model.audio.num_frames(batch.wave.shape[1])
    da = model.audio.dim
    assert x["student_frames"].shape == (2, t, da) and x["teacher_frames"].shape == (2, t, da)
    valid = model.audio(batch.wave, batch.lengths).frame_mask
    assert x["distill_mask"].shape == (2, t) and not (x["distill_mask"] & ~valid).any()
    assert x["distill_mask"].sum(1).tolist() == [math.floor(0.5 * int(n) + 0.5) for n in valid.sum(1)]
    assert not x["teacher_frames"].requires_grad and x["student_frames"].requires_grad
    with torch.no_grad():
        torch.testing.assert_close(x["teacher_frames"], state.teacher(batch.wave, batch.lengths).frames)
    assert x["caption_logits"].shape[:2] == x["caption_targets"].shape and x["caption_logits"].shape[2] == 27
    assert (x["caption_targets"][1] == x["caption_pad_id"]).all()  # the clip without a caption does not count
    loss_cfg = LossConfig(clip=None, distill="cosine", caption=True)
    terms = compute_losses(loss_cfg, LossInputs(**x))
    assert set(terms) == {"aux/distill", "aux/caption", "loss"} and all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    assert all(p.grad is None for p in state.teacher.parameters())
    for p in (model.caption_decoder.token_embed.weight, model.slap_predictor[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.audio.head.conv.weight.grad is not None and model.audio.head.conv.weight.grad.abs().sum() > 0
    # the same step draws the same masks (exact resume); another step draws others
    y = state.inputs(model, batch, step=5)
    torch.testing.assert_close(y["distill_mask"], x["distill_mask"])
    torch.testing.assert_close(y["student_frames"], x["student_frames"])
    assert not torch.equal(state.inputs(model, batch, step=6)["distill_mask"], x["distill_mask"])


def test_caption_reads_clean_frames_when_given(text_dir):
    cfg = tiny_cfg(text_dir, "slap", "loss.distill=null")
    model = build_model(cfg).eval()
    assert model.slap_predictor is None and model.caption_decoder is not None
    state = SLAPState.create(model, cfg)
    assert state.teacher is None
    batch = _batch([1.0, 0.6], ["a cat meowing", "a car horn"])
    with torch.no_grad():
        clean = model.audio(batch.wave, batch.lengths)
        x = state.inputs(model, batch, 0, clean_frames=clean.frames, clean_mask=clean.frame_mask)
        assert "student_frames" not in x
        inputs, _ = prepare_targets(model.text.tokenizer, batch.captions, model.caption_decoder.max_len)
        torch.testing.assert_close(x["caption_logits"], model.caption_decoder(clean.frames, clean.frame_mask, inputs))
        # without clean frames it runs its own (identical, unmasked) pass
        torch.testing.assert_close(state.inputs(model, batch, 0)["caption_logits"], x["caption_logits"])


def test_slap_training_steps_reduce_losses(text_dir):
    torch.manual_seed(0)
    cfg = tiny_cfg(text_dir)
    model = build_model(cfg).train()
    state = SLAPState.create(model, cfg, decay=0.9)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    batch = _batch([1.0, 0.8], ["a dog barking", "rain falling"], seed=1)
    loss_cfg = LossConfig(clip=None, distill="cosine", caption=True)
    teacher0 = state.teacher.head.conv.weight.clone()
    history = []
    for step in range(25):
        terms = compute_losses(loss_cfg, LossInputs(**state.inputs(model, batch, step)))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        state.update(model)
        history.append({k: float(v.detach()) for k, v in terms.items()})
    assert history[-1]["aux/caption"] < 0.5 * history[0]["aux/caption"]
    assert not torch.equal(state.teacher.head.conv.weight, teacher0)
    # the teacher state round-trips (resume)
    saved = state.state_dict()
    other = SLAPState.create(model, cfg)
    assert other.load_state_dict(saved)
    for a, b in zip(other.teacher.state_dict().values(), state.teacher.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert not other.load_state_dict(None, model)  # no saved teacher: re-copied from the student


def test_slap_config_checks(text_dir):
    cfg = tiny_cfg(text_dir)
    assert cfg.preset == "slap" and cfg.loss.terms() == ["clip/infonce", "aux/distill", "aux/caption"]
    assert cfg.audio.clip_seconds == cfg.audio.max_seconds and cfg.data.bucket_by_duration
    full = load_run_config(REPO / "configs" / "slap.yaml")
    assert full.audio.clip_seconds == full.audio.max_seconds == 30.0
    model = build_model(cfg)
    with pytest.raises(ConfigError, match="accum_steps"):
        SLAPState.create(model, tiny_cfg(text_dir, "slap", "train.accum_steps=2"))
    frozen = tiny_cfg(text_dir, "slap", f"model.audio={dict(TINY_CNN, freeze=True)}".replace("'", '"').replace("True", "true"))
    with pytest.raises(ConfigError, match="frozen"):
        SLAPState.create(build_model(frozen), frozen)
    plain = build_model(tiny_cfg(text_dir, "clap"))  # a model without SLAP's modules
    assert plain.caption_decoder is None and plain.slap_predictor is None
    with pytest.raises(ConfigError, match="model.caption_decoder"):
        slap_inputs(plain, None, _batch([1.0], ["a dog"]), LossConfig(clip=None, caption=True), mask_generator(0, 0))


# ============================================================================ checkpoints and the command


def _wav(path: Path, seconds: float, f: float) -> Path:
    t = np.arange(int(seconds * SR)) / SR
    sf.write(path, (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), SR)
    return path


def test_checkpoint_roundtrip_and_caption_command(text_dir, tmp_path, capsys):
    from finelap.cli import main

    cfg = tiny_cfg(text_dir)
    model = build_model(cfg)
    ckpt = save_checkpoint(tmp_path / "run" / "step_1", model, cfg, step=1, rng=False)
    loaded, run_cfg, _ = load_pretrained(ckpt)
    assert run_cfg.preset == "slap"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    a, b = _wav(tmp_path / "a.wav", 1.5, 440.0), _wav(tmp_path / "b.wav", 0.7, 880.0)
    assert main(["caption", str(a), str(b), "--checkpoint", str(ckpt), "--beam", "2", "--max-len", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in out["results"]] == [str(a), str(b)]
    # the command's tokens are the decoder's beam search on the file's frames
    from finelap.audio import load_audio

    for r, path in zip(out["results"], (a, b)):
        with torch.no_grad():
            feats = loaded.audio(torch.from_numpy(load_audio(path, SR))[None])
            ids = loaded.caption_decoder.generate(feats.frames, feats.frame_mask, max_len=6, beam_size=2)[0]
        assert r["tokens"] == ids and 1 <= len(ids) <= 6
        assert r["caption"] == loaded.text.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert main(["caption", str(a), "--checkpoint", str(ckpt), "--beam", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{a}\t")


def _strip_new_model_fields(ckpt: Path, **loss: object) -> None:
    """Make `ckpt` look written before model.caption_decoder / model.slap_predictor existed: the
    training code of that time wrote every other field as today, and `loss` edits as given."""
    meta = json.loads((ckpt / "config.json").read_text())
    for k in ("caption_decoder", "slap_predictor"):
        del meta["config"]["model"][k]
    meta["config"]["loss"].update(loss)
    (ckpt / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("loss", [{}, {"caption": False, "distill": None, "weights": {"clip": 1.0}}], ids=["loss-says", "weights-say"])
def test_checkpoint_from_before_the_model_fields_loads(text_dir, tmp_path, loss):
    """Old config.json: the decoder and predictor are derived from loss.caption / loss.distill or,
    when the loss section does not ask for them (a run fine-tuned with the terms off), from the
    weights' key names; the load says what it derived and the weights load strictly."""
    cfg = tiny_cfg(text_dir)
    torch.manual_seed(0)
    model = build_model(cfg)
    ckpt = save_checkpoint(tmp_path / "run" / "step_1", model, cfg, step=1, rng=False)
    _strip_new_model_fields(ckpt, **loss)
    with pytest.warns(UserWarning, match=r"predates.*model\.caption_decoder = default sizes.*model\.slap_predictor = true"):
        loaded, run_cfg, _ = load_pretrained(ckpt)
    assert run_cfg.model.caption_decoder == CaptionDecoderConfig() and run_cfg.model.slap_predictor
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_upgrade_checkpoint_config_reads_keys_only_when_needed():
    def no_keys():
        raise AssertionError("the loss section decides; the weights need not be read")

    new = {"model": {"caption_decoder": None, "slap_predictor": False}, "loss": {"caption": True}}
    assert upgrade_checkpoint_config(new, no_keys) == (new, [])  # written today: unchanged
    old, notes = upgrade_checkpoint_config({"model": {}, "loss": {"caption": True, "distill": "mse"}}, no_keys)
    assert old["model"] == {"caption_decoder": {}, "slap_predictor": True} and len(notes) == 2
    clap, notes = upgrade_checkpoint_config({"model": {"embed_dim": 8}, "loss": {}}, lambda: ["clip_head.mlp.0.weight"])
    assert clap["model"] == {"embed_dim": 8, "caption_decoder": None, "slap_predictor": False}
    assert notes == []  # nothing derived as present: an old CLAP-style checkpoint loads without a warning
    dec, notes = upgrade_checkpoint_config({"model": {}, "loss": {}}, lambda: ["caption_decoder.embed.weight"])
    assert dec["model"] == {"caption_decoder": {}, "slap_predictor": False}
    assert notes == ["model.caption_decoder = default sizes (the weights hold caption_decoder.*)"]


def test_checkpoint_whose_decoder_differs_from_its_config_is_refused(text_dir, tmp_path):
    cfg = tiny_cfg(text_dir, "slap", "loss.distill=null")
    model = build_model(cfg)
    bigger = save_checkpoint(tmp_path / "a", model, cfg, step=1, rng=False, update_latest=False)
    meta = json.loads((bigger / "config.json").read_text())
    meta["config"]["model"]["caption_decoder"]["layers"] = 3  # config.json no longer describes the weights
    (bigger / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights do not match the architecture"):
        load_pretrained(bigger)
    with torch.no_grad():
        model.caption_decoder.arch[6] = 4  # recorded as built with another start token than the tokenizer's [CLS]
    other = save_checkpoint(tmp_path / "b", model, cfg, step=1, rng=False, update_latest=False)
    with pytest.raises(CheckpointError, match=r"stored caption decoder was built as .*'bos_id': 4"):
        load_pretrained(other)


def test_caption_streams_long_audio_like_one_pass(text_dir, tmp_path):
    """Pipeline.caption encodes window by window (bounded memory for long files); the decoder
    then reads all frames, so the caption equals decoding one-pass frames."""
    from finelap.audio import load_audio
    from finelap.infer import Pipeline
    from finelap.streaming import plan_windows

    cfg = tiny_cfg(text_dir)
    torch.manual_seed(1)
    model = build_model(cfg)
    with torch.no_grad():  # a sharper decoder, so the token choice depends on the frames
        for p in model.caption_decoder.parameters():
            p.mul_(4.0)
    ckpt = save_checkpoint(tmp_path / "run" / "step_1", model, cfg, step=1, rng=False)
    path = _wav(tmp_path / "long.wav", 7.3, 440.0)
    pipe = Pipeline.from_pretrained(ckpt, window_s=1.0, margin_s=1.0)
    assert pipe.can_caption
    assert len(plan_windows(int(7.3 * SR), pipe.timeline, pipe.window_s, pipe.margin_s)) == 8  # really streamed
    got = pipe.caption(str(path), max_len=6, beam_size=2)
    with torch.no_grad():
        feats = pipe.model.audio(torch.from_numpy(load_audio(path, SR))[None])
        ids = pipe.model.caption_decoder.generate(feats.frames, feats.frame_mask, max_len=6, beam_size=2)[0]
    assert got["tokens"] == ids and got["duration_s"] == pytest.approx(7.3)
    assert got["caption"] == pipe.model.text.tokenizer.decode(ids, skip_special_tokens=True).strip()
    # the streamed frames themselves equal one pass (the CNN's receptive field fits in the margin)
    chunks = list(pipe._stream(pipe._open(str(path)), lambda x: x, raw=True))
    streamed = torch.cat([fe for _, fe in chunks])
    torch.testing.assert_close(streamed, feats.frames[0], atol=1e-4, rtol=1e-4)


def test_caption_command_errors(text_dir, tmp_path, capsys):
    from finelap.cli import main

    cfg = tiny_cfg(text_dir, "clap")
    assert not needs_decoder(cfg)
    ckpt = save_checkpoint(tmp_path / "clap" / "final", build_model(cfg), cfg, step=1, rng=False)
    a = _wav(tmp_path / "a.wav", 1.0, 440.0)
    assert main(["caption", str(a), "--checkpoint", str(ckpt)]) == 2
    assert "not trained with a caption decoder (preset slap)" in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "missing.wav"), "--checkpoint", str(ckpt)]) == 2
    assert "missing.wav" in capsys.readouterr().err
    assert main(["caption", str(a), "--checkpoint", str(ckpt), "--beam", "0"]) == 2
    assert "--beam" in capsys.readouterr().err
