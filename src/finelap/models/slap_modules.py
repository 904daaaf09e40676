"""SLAP's extra trainable modules on a `FineLAPModel`: the caption decoder and the distillation
predictor. Built here (models/, below losses and training) so that loading a checkpoint
(`models.build.load_pretrained`) can rebuild them without importing the training hook; the
hook itself (`finelap.train.slap`) decides from the loss config when to attach them.

- ``model.caption_decoder``: a `CaptionDecoder` over the audio encoder's frames, using the text
  tower's tokenizer ([CLS] start, [SEP] end, [PAD]).
- ``model.slap_predictor``: Linear-GELU-Linear (Da -> Da) on the student's frames (the
  BYOL/data2vec predictor that makes student and teacher asymmetric).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from .decoder import CaptionDecoder, special_token_ids

__all__ = ["DECODER_DEFAULTS", "DECODER_ATTR", "PREDICTOR_ATTR", "attach_aux_modules", "loss_wants_aux_modules"]

DECODER_DEFAULTS: dict[str, int] = {"dim": 256, "layers": 2, "heads": 4, "max_len": 32}

DECODER_ATTR = "caption_decoder"
PREDICTOR_ATTR = "slap_predictor"


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def loss_wants_aux_modules(loss: Any) -> tuple[bool, bool]:
    """(caption decoder wanted, predictor wanted) from a loss section: a `LossConfig`, a plain
    mapping or None, read by field name (loss.caption, loss.distill) so that models/ does not
    import losses/. Defaults as in `LossConfig`: caption false, distill null."""
    if loss is None:
        return False, False
    if isinstance(loss, Mapping):
        return bool(loss.get("caption", False)), loss.get("distill") is not None
    return bool(getattr(loss, "caption", False)), getattr(loss, "distill", None) is not None


def attach_aux_modules(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    decoder: bool = False,
    predictor: bool = False,
) -> None:
    """Register the caption decoder and/or the predictor on `model` (in place; idempotent).

    Each is attached when asked for (`decoder`, `predictor`) or when `state_dict` holds one; a
    stored decoder's architecture comes from its ``arch`` buffer, so a checkpoint rebuilds exactly
    what was trained (the decoder then is `DECODER_DEFAULTS`-independent). New modules are placed
    on the model's device. Call before building the optimizer / EMA state, and before
    ``model.load_state_dict`` of a checkpoint that has them.
    """
    device = _device_of(model)
    state = state_dict or {}
    da = int(model.audio.dim)
    if getattr(model, DECODER_ATTR, None) is None:
        if f"{DECODER_ATTR}.arch" in state:
            dec = CaptionDecoder.from_state_dict(state, prefix=f"{DECODER_ATTR}.")
            if dec.dim_audio != da:
                raise CheckpointError(f"caption decoder reads {dec.dim_audio}-d frames but the audio encoder emits {da}-d frames")
            setattr(model, DECODER_ATTR, dec.to(device))
        elif decoder:
            tok = model.text.tokenizer
            bos, eos, pad = special_token_ids(tok)
            dec = CaptionDecoder(da, len(tok), **DECODER_DEFAULTS, bos_id=bos, eos_id=eos, pad_id=pad)
            setattr(model, DECODER_ATTR, dec.to(device))
    if getattr(model, PREDICTOR_ATTR, None) is None and (predictor or f"{PREDICTOR_ATTR}.0.weight" in state):
        setattr(model, PREDICTOR_ATTR, nn.Sequential(nn.Linear(da, da), nn.GELU(), nn.Linear(da, da)).to(device))
