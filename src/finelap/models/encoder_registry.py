"""Audio encoders by name, each with a typed options dataclass.

A config names an encoder (`model.audio_encoder: cnn`) and gives its options as a dict
(`model.audio: {dim: 256, mel: {...}}`, the same in YAML and in a checkpoint's config.json). An
encoder registers itself with the dataclass of its options:

    @dataclass(kw_only=True)
    class MyOptions(AudioEncoderOptions):
        dim: int = 256

    @register_audio_encoder("mine", options=MyOptions)
    class MyEncoder(AudioEncoder):
        def __init__(self, dim: int = 256, freeze: bool = False, lr_mult: float = 1.0): ...

`build_audio_encoder("mine", **model.audio)` builds the options from the dict with
`finelap.config.from_dict`, as every config section is built (unknown keys and wrong types are
ConfigErrors naming `model.audio.<key>`, with a suggestion), and passes every field to the
builder as keyword arguments. The fields are the builder's keyword arguments with the same
defaults (tests/test_models.py checks every registered encoder). An encoder registered without
options gets the dict as given.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

from ..config import from_dict
from ..errors import ConfigError
from ..registry import AUDIO_ENCODERS

__all__ = [
    "AudioEncoderOptions",
    "register_audio_encoder",
    "audio_encoder_options",
    "parse_audio_encoder_options",
    "build_audio_encoder",
]

B = TypeVar("B", bound=Callable[..., Any])


@dataclass(kw_only=True)
class AudioEncoderOptions:
    """Options every encoder takes. freeze: no gradients into the encoder, eval mode (its norms and
    dropout fixed); lr_mult: learning-rate multiplier of its parameters (>= 0)."""

    freeze: bool = False
    lr_mult: float = 1.0


_OPTIONS: dict[str, type] = {}  # encoder name -> its options dataclass


def register_audio_encoder(name: str, *, options: type | None = None, override: bool = False) -> Callable[[B], B]:
    """Decorator: make a builder (class or function returning an AudioEncoder) available by name,
    with `options` (a dataclass whose fields are the builder's keyword arguments) when given."""
    if options is not None and not dataclasses.is_dataclass(options):
        raise TypeError(f"audio encoder {name!r}: options must be a dataclass, got {options!r}")

    def deco(builder: B) -> B:
        AUDIO_ENCODERS.register(name, override=override)(builder)
        if options is None:
            _OPTIONS.pop(name, None)
        else:
            _OPTIONS[name] = options
        return builder

    return deco


def audio_encoder_options(name: str) -> type | None:
    """The options dataclass of the encoder registered as `name` (None: registered without one).
    ConfigError for an unknown name."""
    AUDIO_ENCODERS.get(name)  # loads the registering modules; unknown names fail here
    return _OPTIONS.get(name)


def parse_audio_encoder_options(name: str, values: Mapping[str, Any], where: str = "model.audio") -> Any:
    """The options dataclass of encoder `name` filled from `values` (a config's `model.audio`), the
    values converted by its field types as every config section is (`finelap.config.from_dict`).

    Raises ConfigError naming `<where>.<key>` and the encoder for an unknown key (with the closest
    option), a value of the wrong type or a missing required option; or when `name` has no options
    dataclass."""
    cls = audio_encoder_options(name)
    if cls is None:
        raise ConfigError(f"audio encoder {name!r} was registered without an options dataclass")
    try:
        return from_dict(cls, values, where)
    except ConfigError as e:
        raise ConfigError(f"{e} (options of audio encoder {name!r})") from None


def build_audio_encoder(name: str, **kwargs: Any) -> Any:
    """Build the encoder registered as `name` from its keyword options (a config's `model.audio`),
    checked against its options dataclass (ConfigError on bad names or options)."""
    builder = AUDIO_ENCODERS.get(name)
    if audio_encoder_options(name) is not None:
        opts = parse_audio_encoder_options(name, kwargs)
        return builder(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.init})
    try:
        return builder(**kwargs)
    except TypeError as e:  # a misspelt option: say which encoder and which options
        raise ConfigError(f"audio encoder {name!r}: bad options {sorted(kwargs)} ({e})") from None
