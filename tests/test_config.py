"""Typed configs: dict <-> dataclass, YAML inheritance, dotted overrides, validation; the registry."""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from finelap import config as C
from finelap.config import (
    AudioConfig,
    DataConfig,
    EvalConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_run_config,
    load_yaml,
    resolve_run_config,
    save_config,
    to_dict,
)
from finelap.errors import ConfigError
from finelap.registry import PRESETS, Registry, preset_path


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Inner:
    dim: int = 4
    act: Literal["gelu", "relu"] = "gelu"
    scale: Optional[float] = None


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    layers: list[Inner] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    shape: tuple[int, int] = (1, 2)
    dims: tuple[int, ...] = ()
    color: Color = Color.RED
    path: Optional[Path] = None
    either: int | str = 0


# ----------------------------------------------------------------------------- from_dict / to_dict


def test_from_dict_builds_nested_types() -> None:
    o = from_dict(Outer, {
        "name": "x",
        "inner": {"dim": 8, "act": "relu", "scale": "1e-3"},  # YAML 1.1 reads 1e-3 as a string
        "layers": [{"dim": 1}, {"act": "relu"}],
        "weights": {"frame": 2, "clip": 0.5},
        "shape": [3, 4],
        "dims": [5, 6, 7],
        "color": "blue",
        "path": "a/b.yaml",
        "either": "text",
    })
    assert o.inner == Inner(8, "relu", 1e-3)
    assert o.layers == [Inner(dim=1), Inner(act="relu")]
    assert o.weights == {"frame": 2.0, "clip": 0.5} and isinstance(o.weights["frame"], float)
    assert o.shape == (3, 4) and o.dims == (5, 6, 7)
    assert o.color is Color.BLUE and o.path == Path("a/b.yaml") and o.either == "text"
    assert from_dict(Outer, {"name": "y", "either": 3}).either == 3


def test_unknown_key_names_dotted_key_and_suggests() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, {"name": "x", "layers": [{"dim": 1}, {"dimm": 2}]})
    msg = str(e.value)
    assert "'layers.1.dimm'" in msg and "did you mean 'dim'" in msg and "dim, act, scale" in msg
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'.*did you mean 'lr'"):
        resolve_run_config({"train": {"lrr": 0.1}})


@pytest.mark.parametrize(
    "d, match",
    [
        ({"name": "x", "inner": {"dim": "four"}}, r"'inner\.dim': expected an integer"),
        ({"name": "x", "inner": {"dim": 2.5}}, r"'inner\.dim': expected an integer"),
        ({"name": "x", "inner": {"act": "tanh"}}, r"'inner\.act': 'tanh' is not one of 'gelu', 'relu'"),
        ({"name": "x", "shape": [1, 2, 3]}, r"'shape': expected 2 items"),
        ({"name": "x", "color": "green"}, r"'color': 'green' is not one of"),
        ({"name": "x", "inner": 3}, r"'inner': expected a mapping"),
        ({"inner": {}}, r"missing required config key 'name'"),
    ],
)
def test_type_errors_name_the_key(d: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        from_dict(Outer, d)


def test_bool_is_strict() -> None:
    with pytest.raises(ConfigError, match=r"'data\.bucket_by_duration': expected true/false"):
        resolve_run_config({"data": {"bucket_by_duration": "yes"}})
    with pytest.raises(ConfigError, match=r"expected an integer"):
        resolve_run_config({"train": {"max_steps": True}})


def test_round_trip_to_dict_from_dict_via_json_and_yaml() -> None:
    o = from_dict(Outer, {"name": "x", "layers": [{"dim": 2}], "shape": [3, 4], "color": "blue", "path": "p"})
    d = to_dict(o)
    assert d["shape"] == [3, 4] and d["color"] == "blue" and d["path"] == "p"
    assert from_dict(Outer, json.loads(json.dumps(d))) == o
    assert from_dict(Outer, yaml.safe_load(yaml.safe_dump(d))) == o
    cfg = resolve_run_config({"train": {"lr": 3e-4, "ema_decay": 0.999}, "data": {"train": ["a.jsonl"]}, "name": "r1"})
    assert resolve_run_config(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ----------------------------------------------------------------------------- overrides


def test_dotted_overrides() -> None:
    base = {"train": {"lr": 1e-3}, "loss": {"weights": {"clip": 1.0, "frame": 1.0}}}
    out = apply_overrides(base, [
        "loss.weights.frame=2.0",
        "train.max_steps=100",
        "train.lr=3e-4",
        "data.train=[a.jsonl,b.jsonl]",
        "data.mix={captions: 0.25, events: 0.75}",
        "train.ema_decay=null",
        "name=my-run",
    ])
    assert out["loss"]["weights"] == {"clip": 1.0, "frame": 2.0}
    assert out["train"]["max_steps"] == 100 and out["data"]["train"] == ["a.jsonl", "b.jsonl"]
    assert out["data"]["mix"] == {"captions": 0.25, "events": 0.75}
    assert out["train"]["ema_decay"] is None and out["name"] == "my-run"
    assert base["loss"]["weights"]["frame"] == 1.0  # input not mutated
    cfg = resolve_run_config({k: v for k, v in out.items() if k != "loss"})
    assert cfg.train.lr == 3e-4 and cfg.data.mix == {"captions": 0.25, "events": 0.75}
    # a dict value merges into an existing section instead of replacing it
    assert apply_overrides(base, ["loss.weights={frame: 3}"])["loss"]["weights"] == {"clip": 1.0, "frame": 3}
    # loss term names hold "/": a dotted key may end in one
    assert apply_overrides(base, ["loss.weights.aux/distill=0.5"])["loss"]["weights"] == {"clip": 1.0, "frame": 1.0, "aux/distill": 0.5}
    # a single path for a list field becomes a one-element list
    assert resolve_run_config(apply_overrides({}, ["data.train=x.jsonl"])).data.train == ["x.jsonl"]


@pytest.mark.parametrize(
    "ov, match",
    [
        ("train.lr", r"not of the form key\.sub=value"),
        ("=3", r"is not a dotted key"),
        ("train..lr=3", r"is not a dotted key"),
        ("train lr=3", r"is not a dotted key"),
        ("train.lr.x=3", r"'train\.lr' is a value"),
        ("data.train=[a, b", r"cannot parse value"),
    ],
)
def test_malformed_overrides(ov: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides({"train": {"lr": 1.0}}, [ov])


def test_override_of_unknown_key_is_caught_with_dotted_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'audio\.n_mel'.*did you mean 'n_mels'"):
        resolve_run_config(apply_overrides({}, ["audio.n_mel=128"]))


# ----------------------------------------------------------------------------- YAML


def test_yaml_inheritance_deep_merges(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "train:\n  lr: 0.001\n  max_steps: 500\nloss:\n  weights: {clip: 1.0, frame: 1.0}\nname: base\n"
    )
    (tmp_path / "mid.yaml").write_text("base: base.yaml\ntrain:\n  max_steps: 50\n  warmup_steps: 5\n")
    (tmp_path / "top.yaml").write_text("defaults: [mid]\nloss:\n  weights: {frame: 2.0}\nname: top\n")
    d = load_yaml(tmp_path / "top.yaml")
    assert d == {
        "train": {"lr": 0.001, "max_steps": 50, "warmup_steps": 5},
        "loss": {"weights": {"clip": 1.0, "frame": 2.0}},
        "name": "top",
    }


def test_yaml_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular config inheritance"):
        load_yaml(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: base config 'nope\.yaml' not found"):
        load_yaml(tmp_path / "c.yaml")
    (tmp_path / "bad.yaml").write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_save_config_writes_yaml_and_json_that_load_back(tmp_path: Path) -> None:
    cfg = resolve_run_config({"train": {"lr": 2e-4, "max_steps": 10, "warmup_steps": 2}, "preset": "finelap"})
    written = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert [p.name for p in written] == ["config.yaml", "config.json"]
    assert resolve_run_config(load_yaml(written[0])) == cfg
    assert resolve_run_config(json.loads(written[1].read_text())) == cfg
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temp files left


def test_load_run_config_with_overrides_and_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "base.yaml").write_text("train: {max_steps: 40, warmup_steps: 4}\n")
    (tmp_path / "mine.yaml").write_text("base: base.yaml\npreset: mine\n")
    cfg = load_run_config(tmp_path / "mine.yaml", ["train.lr=5e-4"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.preset) == (40, 5e-4, "mine")
    monkeypatch.setitem(PRESETS._items, "mine", tmp_path / "mine.yaml")
    assert load_run_config("mine").train.max_steps == 40


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "d, match",
    [
        ({"train": {"warmup_steps": 200, "max_steps": 100}}, r"train\.warmup_steps \(200\) must be in \[0, train\.max_steps=100\]"),
        ({"train": {"accum_steps": 0}}, r"train\.accum_steps must be > 0"),
        ({"train": {"precision": "fp16"}}, r"'train\.precision': 'fp16' is not one of 'fp32', 'bf16'"),
        ({"train": {"device": "tpu"}}, r"train\.device 'tpu' is not one of"),
        ({"train": {"precision": "bf16", "device": "mps"}}, r"bf16 .* not mps"),
        ({"train": {"ema_decay": 1.0}}, r"train\.ema_decay must be in \(0, 1\)"),
        ({"train": {"grad_clip": 0}}, r"train\.grad_clip must be > 0"),
        ({"data": {"mix": {"captions": 0, "events": 0}}}, r"data\.mix: at least one ratio must be > 0"),
        ({"data": {"mix": {"captions": -1, "events": 2}}}, r"data\.mix: ratios must be >= 0"),
        ({"data": {"mix": {"caption": 1}}}, r"unknown stream 'caption' \(did you mean 'captions'\?\)"),
        ({"data": {"caption_template": "sound of"}}, r"data\.caption_template must contain '\{\}'"),
        ({"data": {"phrases_per_clip": 0}}, r"data\.phrases_per_clip must be > 0"),
        ({"eval": {"prompt_template": "{} and {}"}}, r"eval\.prompt_template must contain"),
        ({"eval": {"labels": ["dog", "cat", "dog"]}}, r"duplicate label 'dog'"),
        ({"audio": {"win_length": 1024, "n_fft": 512}}, r"audio: win_length \(1024\) must be <= n_fft"),
        ({"audio": {"fmax": 9000}}, r"fmax"),
        ({"audio": {"clip_seconds": 60}}, r"audio\.clip_seconds \(60.0\) exceeds audio\.max_seconds"),
        ({"name": "a/b"}, r"must be a plain file name"),
    ],
)
def test_validation_rejects_contradictions(d: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_run_config(d)


def test_defaults_are_valid_and_mel_config_matches_audio() -> None:
    cfg = RunConfig()
    mel = cfg.audio.mel_config()
    assert (mel.sample_rate, mel.n_fft, mel.hop_length, mel.n_mels) == (16000, 512, 160, 64)
    assert cfg.data.eval_batch_size == cfg.data.batch_size
    assert DataConfig(val_batch_size=7).eval_batch_size == 7
    assert isinstance(cfg.train, TrainConfig) and isinstance(cfg.eval, EvalConfig) and isinstance(cfg.audio, AudioConfig)


def test_loss_and_model_sections_are_typed_dataclasses() -> None:
    import typing

    from finelap.loss_config import LossConfig
    from finelap.model_config import ModelConfig

    hints = typing.get_type_hints(RunConfig)
    assert hints["loss"] is LossConfig and hints["model"] is ModelConfig
    cfg = resolve_run_config({"loss": {"clip": "sigmoid", "weights": {"clip": 2.0}}, "model": None})
    assert isinstance(cfg.loss, LossConfig) and cfg.loss.clip == "sigmoid" and cfg.loss.weight("clip/sigmoid") == 2.0
    assert cfg.model == ModelConfig()  # an empty section: its defaults
    assert to_dict(cfg)["loss"]["clip"] == "sigmoid"
    with pytest.raises(ConfigError, match=r"unknown config key 'loss\.clipp'.*did you mean 'clip'"):
        resolve_run_config({"loss": {"clipp": "sigmoid"}})
    with pytest.raises(ConfigError, match=r"'loss' must be a mapping, got list"):
        resolve_run_config({"loss": ["sigmoid"]})


def test_model_section_is_typed_to_the_leaves() -> None:
    import typing

    import finelap.models.model as M
    import finelap.models.text_encoders as TE
    from finelap.model_config import CaptionDecoderConfig, ModelConfig, TextEncoderConfig

    assert typing.get_type_hints(RunConfig)["model"] is ModelConfig
    assert M.ModelConfig is ModelConfig and TE.TextEncoderConfig is TextEncoderConfig  # the old paths re-export
    cfg = resolve_run_config({"model": {"embed_dim": 32, "text": {"freeze": True}, "caption_decoder": {"layers": 3}}})
    assert isinstance(cfg.model, ModelConfig) and cfg.model.embed_dim == 32
    assert isinstance(cfg.model.text, TextEncoderConfig) and cfg.model.text.freeze
    assert cfg.model.caption_decoder == CaptionDecoderConfig(layers=3)
    assert resolve_run_config({"model": None}).model == ModelConfig()  # an empty `model:` section
    assert to_dict(resolve_run_config(to_dict(cfg))) == to_dict(cfg)
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.embed_dimm'.*did you mean 'embed_dim'"):
        resolve_run_config({"model": {"embed_dimm": 32}})
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.caption_decoder\.width'"):
        resolve_run_config({"model": {"caption_decoder": {"width": 3}}})
    with pytest.raises(ConfigError, match=r"model\.caption_decoder\.dim \(30\) must be divisible by heads \(4\)"):
        resolve_run_config({"model": {"caption_decoder": {"dim": 30}}})


def test_slap_losses_put_their_modules_into_the_model_section() -> None:
    """loss.caption / loss.distill train model modules: the model section records them (so a
    checkpoint's config.json builds them); explicit decoder sizes are kept."""
    from finelap.model_config import CaptionDecoderConfig

    plain = resolve_run_config({})
    assert plain.model.caption_decoder is None and plain.model.slap_predictor is False
    cfg = resolve_run_config({"loss": {"caption": True, "distill": "cosine"}})
    assert cfg.model.caption_decoder == CaptionDecoderConfig() and cfg.model.slap_predictor is True
    assert to_dict(cfg)["model"]["caption_decoder"] == {"dim": 256, "layers": 2, "heads": 4, "max_len": 32}
    sized = resolve_run_config({"loss": {"caption": True}, "model": {"caption_decoder": {"dim": 64, "heads": 2}}})
    assert sized.model.caption_decoder == CaptionDecoderConfig(dim=64, heads=2) and sized.model.slap_predictor is False
    # a model may carry the modules without training them (fine-tuning a SLAP checkpoint)
    kept = resolve_run_config({"model": {"caption_decoder": {}, "slap_predictor": True}})
    assert kept.model.caption_decoder == CaptionDecoderConfig() and kept.model.slap_predictor


def test_slap_options_are_config() -> None:
    cfg = resolve_run_config({})
    assert (cfg.train.slap.mask_ratio, cfg.train.slap.mask_block, cfg.train.slap.teacher_decay) == (0.5, 5, None)
    assert cfg.train.slap_teacher_decay == 0.99  # neither train.slap.teacher_decay nor train.ema_decay set
    assert resolve_run_config({"train": {"ema_decay": 0.9}}).train.slap_teacher_decay == 0.9
    assert resolve_run_config({"train": {"ema_decay": 0.9, "slap": {"teacher_decay": 0.5}}}).train.slap_teacher_decay == 0.5
    over = resolve_run_config(apply_overrides({}, ["train.slap.mask_ratio=0.25", "train.slap.mask_block=3"]))
    assert (over.train.slap.mask_ratio, over.train.slap.mask_block) == (0.25, 3)
    for bad, match in (({"mask_ratio": 1.0}, r"train\.slap\.mask_ratio must be in \(0, 1\)"),
                       ({"mask_block": 0}, r"train\.slap\.mask_block must be >= 1"),
                       ({"teacher_decay": 1.5}, r"train\.slap\.teacher_decay must be in \(0, 1\)")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            resolve_run_config({"train": {"slap": bad}})


# ----------------------------------------------------------------------------- registry


def test_registry_register_get_names() -> None:
    reg: Registry = Registry("widget")

    @reg.register("b")
    def make_b() -> str:
        return "b"

    @reg.register()
    def alpha() -> str:
        return "a"

    assert reg.names() == ["alpha", "b"] and reg.get("b") is make_b and "alpha" in reg
    with pytest.raises(ConfigError, match=r"unknown widget 'alpah' \(did you mean 'alpha'\?\); available: alpha, b"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("b")(alpha)
    reg.register("b", override=True)(alpha)
    assert reg.get("b") is alpha


def test_registry_imports_its_modules_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fl_plugin_mod.py").write_text(
        "from finelap.registry import Registry\nimport test_reg_holder\n"
        "test_reg_holder.REG.register('plugged')(len)\n"
    )
    (tmp_path / "test_reg_holder.py").write_text(
        "from finelap.registry import Registry\nREG = Registry('thing', ['fl_plugin_mod', 'fl_not_written_yet'])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import test_reg_holder  # type: ignore[import-not-found]

    assert test_reg_holder.REG.names() == ["plugged"]  # missing module tolerated, present one imported


def test_preset_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("finelap.registry.preset_dirs", lambda: [tmp_path])
    (tmp_path / "finelap.yaml").write_text("preset: finelap\n")
    assert preset_path("finelap") == tmp_path / "finelap.yaml"
    with pytest.raises(ConfigError, match=r"unknown preset 'finelp' \(did you mean 'finelap'\?\); available: finelap"):
        preset_path("finelp")


def test_audio_config_is_the_mel_config_plus_crop_lengths() -> None:
    """The mel fields are defined once (MelConfig); AudioConfig adds the crop lengths, keeps the
    YAML keys, and mel_config() carries every mel field over (non-default values included)."""
    import dataclasses

    from finelap.audio import MelConfig
    from finelap.mel_config import MelConfig as FloorOneMel

    assert MelConfig is FloorOneMel and issubclass(C.AudioConfig, MelConfig)
    extra = [f.name for f in dataclasses.fields(C.AudioConfig) if f.name not in {g.name for g in dataclasses.fields(MelConfig)}]
    assert extra == ["clip_seconds", "max_seconds"]
    cfg = resolve_run_config({"audio": {"sample_rate": 22050, "n_fft": 1024, "win_length": 1024, "hop_length": 256,
                                        "n_mels": 80, "fmin": 0.0, "fmax": 11025.0, "top_db": 80.0, "clip_seconds": 4.0}})  # fmt: skip
    got = cfg.audio.mel_config()
    assert type(got) is MelConfig
    assert got == MelConfig(sample_rate=22050, n_fft=1024, win_length=1024, hop_length=256, n_mels=80, fmin=0.0, fmax=11025.0, top_db=80.0)
    assert to_dict(cfg)["audio"]["n_mels"] == 80 and cfg.audio.clip_seconds == 4.0
    with pytest.raises(ConfigError, match=r"^audio: win_length \(2048\) must be <= n_fft"):
        resolve_run_config({"audio": {"win_length": 2048}})


def test_config_modules_import_no_torch() -> None:
    """config, model_config and mel_config validate a run config before the heavy imports."""
    import os
    import subprocess
    import sys

    code = ("import sys, finelap.config, finelap.model_config, finelap.mel_config\n"
            "C = finelap.config\n"
            "C.from_dict(C.ModelConfig, {'embed_dim': 8, 'caption_decoder': {}}, 'model'), C.AudioConfig(n_mels=32)\n"
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")  # fmt: skip
    src = str(Path(C.__file__).resolve().parents[1])  # the finelap under test
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
