"""Typed run configuration: one dataclass per concern, YAML files with inheritance, dotted overrides.

The flow a command follows::

    d = load_yaml("configs/finelap.yaml")          # `defaults: base.yaml` is merged in first
    d = apply_overrides(d, ["train.lr=3e-4", "loss.weights.frame=2.0", "data.train=[a.jsonl,b.jsonl]"])
    cfg = resolve_run_config(d)                     # RunConfig; unknown keys -> ConfigError("train.lrr ...")
    save_config(cfg, run_dir / "config.yaml")       # resolved YAML + JSON next to the run

(`load_run_config(path_or_preset, overrides)` does the first three steps.)

The machinery (`from_dict`, `to_dict`) is generic: it builds any nested dataclass from plain dicts
using the field type hints. `RunConfig.model` is `finelap.model_config.ModelConfig` and `RunConfig.loss`
`finelap.loss_config.LossConfig` (torch-free modules on this floor). Validation of
contradictions lives in each dataclass's `__post_init__` and raises `ConfigError`.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import collections.abc
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar

from .errors import ConfigError
from .loss_config import LossConfig
from .mel_config import MelConfig
from .model_config import CaptionDecoderConfig, ModelConfig

T = TypeVar("T")

__all__ = [
    "AudioConfig",
    "DataConfig",
    "EvalConfig",
    "RunConfig",
    "SLAPConfig",
    "TrainConfig",
    "apply_overrides",
    "deep_merge",
    "from_dict",
    "load_run_config",
    "load_yaml",
    "resolve_run_config",
    "save_config",
    "to_dict",
]

# ----------------------------------------------------------------------------- dict <-> dataclass


def _where(path: str) -> str:
    return f"'{path}'" if path else "config"


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves the string annotations that `from __future__ import annotations` leaves.
    try:
        return typing.get_type_hints(cls)
    except Exception as e:  # unresolvable forward reference: a programming error, say where
        raise TypeError(f"cannot resolve type hints of {cls.__qualname__}: {e}") from e


def from_dict(cls: type[T], d: Mapping[str, Any] | T, path: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict, converting values by the field type hints.

    Supported field types: nested dataclasses, Optional/Union, list, tuple, dict, Literal, Enum,
    bool/int/float/str, Path and Any. Unknown keys raise ConfigError naming the dotted key, the valid
    keys and a close match; missing required fields and wrongly typed values raise ConfigError too.
    Numeric strings are accepted for numbers because YAML 1.1 reads `1e-3` as a string.
    `path` is the dotted prefix used in error messages (e.g. "model").
    """
    return _convert(cls, d, path)


def _build_dataclass(cls: type, value: Any, path: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{_where(path)}: expected a mapping for {cls.__name__}, got {type(value).__name__} {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            dotted = _join(path, key)
            raise ConfigError(
                f"unknown config key '{dotted}'{_suggest(str(key), list(fields))}; "
                f"valid keys{' under ' + repr(path) if path else ''}: {', '.join(fields)}"
            )
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(hints.get(name, Any), value[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{_join(path, name)}'")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if path and not str(e).startswith(path):
            raise ConfigError(f"{path}: {e}") from None
        raise
    except (ValueError, TypeError) as e:  # e.g. MelConfig's own checks
        raise ConfigError(f"{_where(path)}: {e}") from None


def _convert(tp: Any, value: Any, path: str) -> Any:
    if tp is Any or tp is object:
        return copy.deepcopy(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build_dataclass(tp, value, path)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{_where(path)}: must not be null (expected {_type_name(tp)})")
        errors = []
        # exact-type members first so `int | str` keeps 3 an int and "a" a str
        members = [a for a in args if a is not type(None)]
        members.sort(key=lambda a: 0 if isinstance(a, type) and type(value) is a else 1)
        for a in members:
            try:
                return _convert(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{_where(path)}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(
            f"{_where(path)}: {value!r} is not one of {', '.join(repr(a) for a in args)}"
            + (_suggest(value, [str(a) for a in args]) if isinstance(value, str) else "")
        )
    if origin in (list, collections.abc.Sequence) or tp is list:
        (item_tp,) = args or (Any,)
        if isinstance(value, str) and item_tp in (str, Any):
            value = [value]  # `data.train=a.jsonl` means a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(path)}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(item_tp, v, _join(path, i)) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(path)}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, _join(path, i)) for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{_where(path)}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(args[i] if args else Any, v, _join(path, i)) for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        kt, vt = args or (Any, Any)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(path)}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_convert(kt, k, path): _convert(vt, v, _join(path, k)) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for m in tp:
            if value == m.value or value == m.name:
                return m
        raise ConfigError(f"{_where(path)}: {value!r} is not one of {', '.join(repr(m.value) for m in tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{_where(path)}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        num = _number(value)
        if num is not None and float(num).is_integer():
            return int(num)
        raise ConfigError(f"{_where(path)}: expected an integer, got {value!r}")
    if tp is float:
        num = _number(value)
        if num is not None:
            return float(num)
        raise ConfigError(f"{_where(path)}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `name=2024` in YAML is an int; the field wants text
        raise ConfigError(f"{_where(path)}: expected a string, got {type(value).__name__} {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{_where(path)}: expected a path, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{_where(path)}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return copy.deepcopy(value)  # unsupported typing construct: pass through unchecked


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def to_dict(obj: Any) -> Any:
    """Plain JSON/YAML-safe structure: dataclasses -> dicts, tuples -> lists, Enums -> values, Paths -> str."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return to_dict(obj.value)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, (str, int, float, bool)) else k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_dict(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise ConfigError(f"cannot serialise config value of type {type(obj).__name__}: {obj!r}")


# ----------------------------------------------------------------------------- YAML, merging, overrides


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """New dict: `override` on top of `base`; nested mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


_INHERIT_KEYS = ("defaults", "base")


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping. A top-level `defaults:` (or `base:`) names one file or a list of files,
    relative to this file's folder, that are loaded first and deep-merged under this one."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"{path}: circular config inheritance ({chain})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    present = [k for k in _INHERIT_KEYS if k in data]
    if len(present) > 1:
        raise ConfigError(f"{path}: use either 'defaults' or 'base', not both")
    if not present:
        return data
    parents = data.pop(present[0])
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: '{present[0]}' must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for p in parents:
        pp = Path(p)
        if not pp.is_absolute():
            pp = path.parent / pp
        if not pp.suffix:
            pp = pp.with_suffix(".yaml")
        if not pp.is_file():
            raise ConfigError(f"{path}: base config '{p}' not found (looked for {pp})")
        merged = deep_merge(merged, load_yaml(pp, (*_seen, resolved)))
    return deep_merge(merged, data)


_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_][A-Za-z0-9_\-/]*)*$")  # "/" for loss terms: loss.weights.frame/prior


def apply_overrides(d: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of `d` with torchtune-style `dotted.key=value` overrides applied.

    Values are parsed with `yaml.safe_load`: `2.0` is a float, `[a.jsonl,b.jsonl]` a list,
    `{frame: 2.0}` a mapping (merged into an existing mapping), `null` is None. Missing intermediate
    sections are created; whether the key exists is checked later by `from_dict`.
    """
    import yaml

    out = copy.deepcopy(dict(d))
    for ov in overrides:
        if not isinstance(ov, str) or "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key.sub=value")
        key, raw = ov.split("=", 1)
        key = key.strip()
        if key.startswith("--"):
            key = key[2:]
        if not _KEY_RE.match(key):
            raise ConfigError(f"override {ov!r}: '{key}' is not a dotted key like train.lr")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {ov!r}: cannot parse value ({getattr(e, 'problem', None) or e})") from None
        parts = key.split(".")
        node: dict[str, Any] = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {ov!r}: '{'.'.join(parts[: i + 1])}' is a value ({child!r}), not a section"
                )
            node = child
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = deep_merge(node[last], value)
        else:
            node[last] = value
    return out


def save_config(obj: Any, path: str | Path, also_json: bool = True) -> list[Path]:
    """Write the resolved config atomically as YAML at `path` (and as JSON next to it, same stem).
    Returns the written paths. `obj` is a dataclass or a plain dict."""
    import yaml

    from .utils import atomic_path, write_json_atomic

    path = Path(path)
    data = to_dict(obj)
    written = []
    if path.suffix == ".json":
        write_json_atomic(path, data)
        return [path]
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True), encoding="utf-8")
    written.append(path)
    if also_json:
        write_json_atomic(path.with_suffix(".json"), data)
        written.append(path.with_suffix(".json"))
    return written


# ----------------------------------------------------------------------------- sections


def _positive(path: str, **values: float | int | None) -> None:
    for k, v in values.items():
        if v is not None and not v > 0:
            raise ConfigError(f"{path}.{k} must be > 0, got {v}")


@dataclass(frozen=True)
class AudioConfig(MelConfig):
    """Audio front-end: the log-mel parameters (the fields of `finelap.mel_config.MelConfig`, one
    definition for both; YAML keys audio.sample_rate, audio.n_mels, ...) plus crop lengths, in
    seconds. Frozen, as MelConfig is."""

    clip_seconds: float = 10.0  # random training crop; shorter clips are padded and masked
    max_seconds: float = 30.0  # longest input encoded in one pass; longer audio is windowed at inference

    def __post_init__(self) -> None:
        _positive("audio", sample_rate=self.sample_rate, n_fft=self.n_fft, win_length=self.win_length,
                  hop_length=self.hop_length, n_mels=self.n_mels, clip_seconds=self.clip_seconds,
                  max_seconds=self.max_seconds)
        try:
            super().__post_init__()
        except ValueError as e:
            raise ConfigError(f"audio: {e}") from None
        if self.clip_seconds > self.max_seconds:
            raise ConfigError(f"audio.clip_seconds ({self.clip_seconds}) exceeds audio.max_seconds ({self.max_seconds})")

    def mel_config(self) -> MelConfig:
        """The plain `MelConfig` of these parameters (the crop lengths left out)."""
        return MelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MelConfig)})


STREAMS = ("captions", "events")  # caption-only clips / clips with strong (frame-level) labels


def _check_template(where: str, template: str) -> None:
    if template.count("{}") != 1:
        raise ConfigError(f"{where} must contain '{{}}' exactly once (where the label goes), got {template!r}")


@dataclass
class DataConfig:
    """Training/validation data. Manifests are JSONL/TSV/CSV/JSON files or WebDataset shard patterns."""

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    # share of each batch drawn from caption-only clips and from clips with strong labels
    mix: dict[str, float] = field(default_factory=lambda: {"captions": 0.5, "events": 0.5})
    phrases_per_clip: int = 20  # K: each annotated clip's phrase set (positives + negatives)
    batch_size: int = 32
    val_batch_size: int | None = None  # None: same as batch_size
    num_workers: int = 0
    bucket_by_duration: bool = True
    num_buckets: int = 4  # duration quantile buckets when bucket_by_duration
    caption_template: str = "{}"  # captions synthesised from event labels, e.g. "the sound of {}"
    cluster_threshold: float = 0.8  # average cosine similarity (text tower) at which label phrases merge into one cluster
    phrase_bank: str | None = None  # saved phrase clusters (JSON); None: built from the training labels

    def __post_init__(self) -> None:
        unknown = [k for k in self.mix if k not in STREAMS]
        if unknown:
            raise ConfigError(f"data.mix: unknown stream '{unknown[0]}'{_suggest(unknown[0], STREAMS)}; streams: {', '.join(STREAMS)}")
        if any(v < 0 for v in self.mix.values()):
            raise ConfigError(f"data.mix: ratios must be >= 0, got {self.mix}")
        if not sum(self.mix.values()) > 0:
            raise ConfigError(f"data.mix: at least one ratio must be > 0, got {self.mix}")
        _positive("data", phrases_per_clip=self.phrases_per_clip, batch_size=self.batch_size,
                  val_batch_size=self.val_batch_size, num_buckets=self.num_buckets)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        _check_template("data.caption_template", self.caption_template)

    @property
    def eval_batch_size(self) -> int:
        return self.val_batch_size or self.batch_size


_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class SLAPConfig:
    """SLAP's masked-frame self-distillation (loss.distill; `finelap.train.slap`).

    mask_ratio: share of each clip's valid frames hidden from the student (data2vec/BEATs-style:
      half). mask_block: frames per contiguous masked block (5 = 200 ms at 25 Hz: too short a gap
      is trivially interpolated). teacher_decay: the EMA teacher's decay; None: train.ema_decay
      when set, else 0.99 (short CPU runs of hundreds of steps need a teacher that follows the
      student); see `TrainConfig.slap_teacher_decay`.
    """

    mask_ratio: float = 0.5
    mask_block: int = 5
    teacher_decay: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"train.slap.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_block < 1:
            raise ConfigError(f"train.slap.mask_block must be >= 1 frame, got {self.mask_block}")
        if self.teacher_decay is not None and not 0 < self.teacher_decay < 1:
            raise ConfigError(f"train.slap.teacher_decay must be in (0, 1) or null, got {self.teacher_decay}")


@dataclass
class TrainConfig:
    """Optimisation and run bookkeeping. Steps count optimizer updates (after accumulation)."""

    seed: int = 0
    max_steps: int = 1000
    max_minutes: float | None = None  # wall-clock budget; the run stops (and saves) when it is spent
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warm-up
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio
    # parameter-name prefix -> lr multiplier on top of the towers' own (model.audio.lr_mult,
    # model.text.lr_mult), e.g. {"clip_head": 0.5, "audio.stem": 0.1}; 0 leaves them out of the
    # optimizer; see finelap.models.model.param_groups. Frozen towers are model config.
    lr_mult: dict[str, float] = field(default_factory=dict)
    grad_clip: float | None = 1.0  # max global grad norm; None disables
    accum_steps: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    ema_decay: float | None = None  # None disables EMA weights
    eval_every: int = 500  # 0 disables periodic validation
    log_every: int = 10
    ckpt_every: int = 1000  # 0: only the final checkpoint
    keep_last: int = 3  # step checkpoints kept on disk (the final one is always kept)
    out_dir: str = "runs/finelap"
    num_threads: int | None = None  # torch intra-op threads; None: torch default
    # frozen pretrained audio towers: "auto" caches each input's encoder frames on disk (in
    # $FINELAP_CACHE/features, default ~/.cache/finelap/features) so later epochs cost only the heads;
    # "memory" keeps them in RAM only; "off" recomputes; any other value is the cache folder
    feature_cache: str = "auto"
    slap: SLAPConfig = field(default_factory=SLAPConfig)  # SLAP's frame masking and EMA teacher (loss.distill)

    @property
    def slap_teacher_decay(self) -> float:
        """SLAP's EMA teacher decay: train.slap.teacher_decay, else train.ema_decay, else 0.99."""
        return self.slap.teacher_decay or self.ema_decay or 0.99

    def __post_init__(self) -> None:
        _positive("train", max_steps=self.max_steps, lr=self.lr, max_minutes=self.max_minutes,
                  grad_clip=self.grad_clip, accum_steps=self.accum_steps, log_every=self.log_every,
                  keep_last=self.keep_last, num_threads=self.num_threads)
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ConfigError(f"train.warmup_steps ({self.warmup_steps}) must be in [0, train.max_steps={self.max_steps}]")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for k, v in self.lr_mult.items():
            if v < 0:
                raise ConfigError(f"train.lr_mult.{k} must be >= 0, got {v}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.eval_every < 0 or self.ckpt_every < 0:
            raise ConfigError("train.eval_every and train.ckpt_every must be >= 0 (0 disables)")
        if not _DEVICE_RE.match(self.device):
            raise ConfigError(f"train.device {self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
        if self.precision == "bf16" and self.device == "mps":
            raise ConfigError("train.precision=bf16 is supported on cpu and cuda, not mps")


@dataclass
class EvalConfig:
    """Validation/evaluation settings (zero-shot classification and sound event detection)."""

    labels: list[str] = field(default_factory=list)  # zero-shot class names; empty: from the eval data
    # How a class label or phrase becomes the text query (finelap.scoring.make_prompt: underscores as
    # spaces, white space collapsed, placed at the single "{}"), for classify, detect, ground,
    # frame_scores, eval and the trainer's validation alike; saved with checkpoints.
    prompt_template: str = "the sound of {}"
    batch_size: int = 32
    sed_threshold: float = 0.5  # on sigmoid frame scores
    median_filter_s: float = 0.0  # smoothing of frame scores before thresholding; 0 disables
    min_event_s: float = 0.0  # detections shorter than this are dropped
    merge_gap_s: float = 0.0  # detections of one class closer than this are merged
    # Detection settings chosen on validation data (`finelap calibrate`, or at the end of training
    # when data.val has strong labels): {"threshold", "class_thresholds", "median_filter_s",
    # "min_duration_s", "merge_gap_s", "criterion", "score", "data", ...}. When set, detect, ground,
    # eval and Pipeline use it instead of the four settings above; None (older checkpoints): those.
    calibration: dict[str, Any] | None = None
    calibrate_after_training: bool = True  # choose the settings above at the end of `finelap train` (needs data.val with events)

    def __post_init__(self) -> None:
        _check_template("eval.prompt_template", self.prompt_template)
        if self.calibration is not None:
            _check_calibration(self.calibration)
        _positive("eval", batch_size=self.batch_size)
        if not 0 <= self.sed_threshold <= 1:
            raise ConfigError(f"eval.sed_threshold must be in [0, 1], got {self.sed_threshold}")
        for k in ("median_filter_s", "min_event_s", "merge_gap_s"):
            if getattr(self, k) < 0:
                raise ConfigError(f"eval.{k} must be >= 0, got {getattr(self, k)}")
        if len(set(self.labels)) != len(self.labels):
            dup = next(x for x in self.labels if self.labels.count(x) > 1)
            raise ConfigError(f"eval.labels: duplicate label {dup!r}")


def _check_calibration(cal: Mapping[str, Any]) -> None:
    """eval.calibration must hold a global threshold in [0, 1], per-class thresholds in [0, 1] and
    non-negative durations in seconds (a hand-edited config.json is read through here)."""
    if not isinstance(cal, Mapping):
        raise ConfigError(f"eval.calibration must be a mapping, got {type(cal).__name__}")
    thr = _number(cal.get("threshold"))
    if thr is None or not 0 <= thr <= 1:
        raise ConfigError(f"eval.calibration.threshold must be a number in [0, 1], got {cal.get('threshold')!r}")
    per = cal.get("class_thresholds") or {}
    if not isinstance(per, Mapping):
        raise ConfigError("eval.calibration.class_thresholds must be a mapping {class: threshold}")
    for k, v in per.items():
        x = _number(v)
        if x is None or not 0 <= x <= 1:
            raise ConfigError(f"eval.calibration.class_thresholds[{k!r}] must be in [0, 1], got {v!r}")
    for k in ("median_filter_s", "min_duration_s", "merge_gap_s"):
        x = _number(cal.get(k, 0.0))
        if x is None or x < 0:
            raise ConfigError(f"eval.calibration.{k} must be a number >= 0 (seconds), got {cal.get(k)!r}")


@dataclass
class RunConfig:
    """A whole run; every section is a typed dataclass (`model`: finelap.model_config.ModelConfig,
    `loss`: finelap.loss_config.LossConfig, which checks its objective names when it is built).

    SLAP's objectives train modules of the model, so turning one on puts the module into the model
    section (and hence into every checkpoint's config.json): loss.caption with no
    model.caption_decoder gives the default `CaptionDecoderConfig`; loss.distill sets
    model.slap_predictor."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preset: str = "custom"
    name: str = "run"

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Za-z0-9_.\-]+$", self.name):
            raise ConfigError(f"name {self.name!r} must be a plain file name (letters, digits, _ . -)")
        if _loss_option(self.loss, "caption", False) and self.model.caption_decoder is None:
            self.model = dataclasses.replace(self.model, caption_decoder=CaptionDecoderConfig())
        if _loss_option(self.loss, "distill", None) is not None and not self.model.slap_predictor:
            self.model = dataclasses.replace(self.model, slap_predictor=True)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _loss_option(loss: Any, name: str, default: Any) -> Any:
    """A loss option by field name, from a LossConfig or a plain mapping."""
    return loss.get(name, default) if isinstance(loss, Mapping) else getattr(loss, name, default)


def resolve_run_config(d: Mapping[str, Any] | RunConfig) -> RunConfig:
    """Typed RunConfig from a merged dict (after load_yaml/apply_overrides)."""
    if isinstance(d, RunConfig):
        return d
    if not isinstance(d, Mapping):
        raise ConfigError(f"config must be a mapping of sections, got {type(d).__name__}")
    d = dict(d)
    for name in ("model", "loss"):
        if name in d and d[name] is None:  # an empty section: its defaults
            del d[name]
        elif name in d and not isinstance(d[name], (Mapping, ModelConfig, LossConfig)):
            raise ConfigError(f"'{name}' must be a mapping, got {type(d[name]).__name__}")
    return from_dict(RunConfig, d)


def load_run_config(config: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """YAML file (or preset name such as "finelap") + dotted overrides -> validated RunConfig."""
    d: dict[str, Any] = {}
    if config is not None:
        p = Path(config)
        if not p.exists() and p.suffix == "" and "/" not in str(config):
            from .registry import preset_path

            p = preset_path(str(config))
        d = load_yaml(p)
    return resolve_run_config(apply_overrides(d, overrides))
