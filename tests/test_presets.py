"""The method presets (configs/<preset>.yaml): each resolves, trains a few tiny steps, writes a
self-describing checkpoint with the preset's named loss terms, and reloads from that checkpoint
alone. Terms of different presets combine by name (finelap + SLAP's self-distillation).

Everything is tiny (4 synthetic clips of 2 s, a 1-layer text tower, 3 steps, 1 thread)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finelap.checkpoint import load_checkpoint
from finelap.config import load_run_config
from finelap.models.build import build_model, load_pretrained
from finelap.models.heads import CodebookAggregator, LocalityAwareBlock, ScaleBias, TextConditionedScaleBias
from finelap.train.loop import train

from tinyfactory import tiny_dataset, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# preset -> the loss terms its metrics.csv must log (exactly), as "train/<term>"
EXPECTED_TERMS: dict[str, set[str]] = {
    "clap": {"clip/infonce"},
    "finelap": {"clip/sigmoid", "frame/sigmoid"},
    "flam": {"clip/infonce", "frame/flam", "frame/prior"},
    "mgaclap": {"clip/hard_negative"},
    "slap": {"clip/infonce", "aux/distill", "aux/caption"},
}
PRESETS = [p for p in EXPECTED_TERMS if p != "slap" or (CONFIGS / "slap.yaml").exists()]
STEPS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(scratch dir, manifest) shared by this module's runs: building the tiny text tower once."""
    root = tmp_path_factory.mktemp("presets")
    return root, tiny_dataset(root / "data", n=8)


def _cfg(tiny, preset: str, out: str, *extra: str):
    root, man = tiny
    ov = tiny_overrides(root, man, out=out, **{"train.max_steps": STEPS}) + list(extra)
    return load_run_config(CONFIGS / f"{preset}.yaml", ov)


def _metrics(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _logged_terms(header: list[str]) -> set[str]:
    return {k[len("train/"):] for k in header if k.startswith("train/") and k != "train/loss"}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_resolves_by_path_and_by_name(preset):
    by_path = load_run_config(CONFIGS / f"{preset}.yaml")
    by_name = load_run_config(preset)  # `finelap train --config flam` finds configs/flam.yaml
    assert by_path.to_dict() == by_name.to_dict()
    assert by_path.preset == preset
    assert set(by_path.loss.terms()) == EXPECTED_TERMS[preset]
    # same encoders and data for every preset: only objectives and heads differ
    base = load_run_config(CONFIGS / "clap.yaml")
    assert by_path.model.audio_encoder == base.model.audio_encoder
    assert by_path.model.text == base.model.text
    assert by_path.model.embed_dim == base.model.embed_dim
    assert by_path.data.batch_size == base.data.batch_size
    assert by_path.eval.prompt_template == base.eval.prompt_template


def test_preset_traits():
    flam = load_run_config(CONFIGS / "flam.yaml")
    assert flam.model.text_conditioned_scale_bias and flam.model.frame_head
    assert (flam.model.frame_scale_init, flam.model.frame_bias_init) == (10.0, -8.0)
    assert flam.loss.clip == "infonce" and flam.loss.frame == "flam" and flam.loss.flam_prior
    mga = load_run_config(CONFIGS / "mgaclap.yaml")
    assert mga.model.codebook_size >= 2 and mga.model.la_block and not mga.model.frame_head
    assert mga.loss.clip == "hard_negative" and mga.loss.hard_negative_beta == 0.15 and mga.loss.frame is None


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_checkpoints_and_reloads(tiny, preset):
    cfg = _cfg(tiny, preset, f"run_{preset}")
    final = train(cfg, progress=False)
    assert final.name == "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["preset"] == preset and saved["config"]["preset"] == preset and saved["step"] == STEPS
    assert saved["config"]["loss"] == json.loads(json.dumps(cfg.to_dict()["loss"]))
    assert saved["preprocessing"]["prompt_template"] == cfg.eval.prompt_template

    header, rows = _metrics(Path(cfg.train.out_dir))
    assert _logged_terms(header) == EXPECTED_TERMS[preset]
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == list(range(1, STEPS + 1))
    weights = cfg.loss.resolved_weights()
    for r in rows:
        if not r.get("train/loss"):
            continue
        vals = {t: float(r[f"train/{t}"]) for t in EXPECTED_TERMS[preset] if r.get(f"train/{t}")}
        assert all(math.isfinite(v) for v in vals.values())
        # the logged total is the weighted sum of the logged terms (composition by name)
        assert float(r["train/loss"]) == pytest.approx(sum(weights[t] * v for t, v in vals.items()), rel=1e-5, abs=1e-5)
    # tiny_dataset has strong labels in every other clip and batches mix both streams, so every
    # step of a frame-loss preset has frame targets
    if cfg.loss.frame is not None:
        frame_terms = [t for t in EXPECTED_TERMS[preset] if t.startswith("frame/")]
        assert all(r.get(f"train/{t}") for r in rows if r.get("train/loss") for t in frame_terms)

    model, run_cfg, ckpt = load_pretrained(final)
    assert run_cfg.preset == preset and ckpt.step == STEPS
    assert not model.training
    # the reloaded weights are the saved ones (every saved tensor is used), and training moved
    # them away from a fresh initialisation with the same seed
    from safetensors.torch import load_file

    saved_weights = load_file(str(final / "model.safetensors"))
    state = model.state_dict()
    assert set(saved_weights) <= set(state)
    for k, v in saved_weights.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    torch.manual_seed(0)
    wave = torch.randn(2, 16000)
    with torch.no_grad():
        e1 = model.encode_audio(wave).audio_embeds
        torch.manual_seed(cfg.train.seed)
        e0 = build_model(run_cfg).eval().encode_audio(wave).audio_embeds
    assert torch.isfinite(e1).all()
    assert not torch.allclose(e1, e0, atol=1e-6)


@pytest.mark.parametrize("preset", ["flam", "mgaclap"])
def test_preset_trains_from_the_cli(tiny, preset):
    """What a user types: `finelap train --config configs/<preset>.yaml key=value ...`."""
    from finelap.cli import main

    root, man = tiny
    ov = tiny_overrides(root, man, out=f"cli_{preset}", **{"train.max_steps": 2})
    assert main(["train", "--config", str(CONFIGS / f"{preset}.yaml"), *ov]) == 0
    saved = json.loads((root / f"cli_{preset}" / "final" / "config.json").read_text())
    assert saved["preset"] == preset and saved["step"] == 2


def test_flam_model_has_per_text_scale_bias_at_init(tiny):
    cfg = _cfg(tiny, "flam", "flam_init")
    model = build_model(cfg).eval()
    assert isinstance(model.frame_scale_bias, TextConditionedScaleBias)
    with torch.no_grad():
        t = model.encode_text(["a dog barking", "rain falling", "a car horn"])
    # alpha(t) = exp(MLP(t)) starts at 10 and beta(t) = MLP(t) at -8 for every text
    torch.testing.assert_close(t.frame_logit_scale, torch.full((3,), 10.0))
    torch.testing.assert_close(t.frame_logit_bias, torch.full((3,), -8.0))


def test_mgaclap_frame_scores_use_codebook_pooled_text(tiny):
    cfg = _cfg(tiny, "mgaclap", "mga_traits")
    model = build_model(cfg).eval()
    assert isinstance(model.codebook, CodebookAggregator) and model.codebook.codebook.shape[0] == cfg.model.codebook_size
    assert isinstance(model.la_block, LocalityAwareBlock)
    assert model.frame_head is None and isinstance(model.frame_scale_bias, ScaleBias)
    torch.manual_seed(1)
    with torch.no_grad():
        a = model.encode_audio(torch.randn(2, 16000))
        t = model.encode_text(["a dog barking", "rain falling"])
        # both modalities are sums of the SAME codewords with sparse weights on the simplex
        for w in (a.codebook_weights, t.codebook_weights):
            assert w is not None and (w >= 0).all()
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]))
        torch.testing.assert_close(t.text_embeds, F.normalize(t.codebook_weights @ model.codebook.codebook, dim=-1))
        torch.testing.assert_close(a.audio_embeds, F.normalize(a.codebook_weights @ model.codebook.codebook, dim=-1))
        # frame-text scores: frame embeddings against the codebook-pooled text embedding
        s, b = model.frame_scale_and_bias(t)
        naive = torch.stack([s * a.frame_embeds[i] @ t.text_embeds.T + b for i in range(2)])
        torch.testing.assert_close(model.frame_logits(a, t), naive)


def test_terms_combine_by_name_finelap_plus_self_distillation(tiny):
    """finelap's objectives plus SLAP's masked-frame self-distillation, weighted by term name."""
    cfg = _cfg(tiny, "finelap", "finelap_distill", "loss.distill=cosine", "loss.weights={aux/distill: 0.5}")
    assert cfg.loss.resolved_weights() == {"clip/sigmoid": 1.0, "frame/sigmoid": 1.0, "aux/distill": 0.5}
    final = train(cfg, progress=False)
    header, rows = _metrics(Path(cfg.train.out_dir))
    assert _logged_terms(header) == {"clip/sigmoid", "frame/sigmoid", "aux/distill"}
    for r in rows:
        if r.get("train/loss"):
            want = float(r["train/clip/sigmoid"]) + float(r["train/frame/sigmoid"]) + 0.5 * float(r["train/aux/distill"])
            assert float(r["train/loss"]) == pytest.approx(want, rel=1e-5, abs=1e-5)
    model, run_cfg, _ = load_pretrained(final, use_ema=False)
    assert run_cfg.preset == "finelap" and run_cfg.loss.distill == "cosine"
    assert run_cfg.model.slap_predictor
    # the distillation head is saved and rebuilt with its trained weights
    saved = load_checkpoint(final, training_state=False, ema=False).state_dict
    head = model.slap_predictor.state_dict()
    assert head and all(torch.equal(v, saved[f"slap_predictor.{k}"]) for k, v in head.items())


def test_unknown_term_weight_is_rejected(tiny):
    from finelap.errors import ConfigError

    with pytest.raises(ConfigError, match="frame/sigmoid is set but that term is not enabled"):
        _cfg(tiny, "clap", "bad", "loss.weights={frame/sigmoid: 2.0}")  # clap has no frame term
