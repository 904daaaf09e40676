"""Frame-level InfoNCE over each clip's phrase set (``loss.frame: frame_infonce``, term
"frame/infonce"): at every annotated frame, a softmax over the clip's phrases must pick the
phrases active there. Where FineLAP's frame stream scores each (frame, phrase) pair on its own
(sigmoid), this one makes the phrases of a clip compete for each frame.

It is also the worked example of adding an objective (docs/architecture.md, "Adding an
objective"): this one file registers it; the inputs are those FineLAP's frame objective gathers.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..loss_config import LossConfig
from ..models.model import frame_logits
from .frame import _check_dist, _normalise, check_phrase_set_shapes, empty_phrase_set, frame_inputs, frame_mask_of, phrase_inputs, phrase_set_present
from .objective import Inputs, Objective, StepContext, any_rank, input_device, register_objective

__all__ = ["frame_info_nce", "FrameInfoNCEObjective"]


def frame_info_nce(
    frame_embeds: torch.Tensor,
    frame_mask: torch.Tensor,
    phrase_embeds: torch.Tensor,
    targets: torch.Tensor,
    phrase_mask: torch.Tensor,
    has_frames: torch.Tensor,
    scale: torch.Tensor | float,
    bias: torch.Tensor | float = 0.0,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Multi-positive InfoNCE over phrases, per frame.

        z[b,t,k] = frame_logits(frame_embeds, phrase_embeds, scale, bias)      (B, T, K)
        q[b,t,k] = targets[b,t,k] / sum_k' targets[b,t,k']                     (valid k only)
        loss     = sum_{b,t with a positive} -sum_k q[b,t,k] log softmax_k(z[b,t,:]) / #{such b,t}

    The softmax runs over the clip's valid phrase slots (phrase_mask); a frame counts when its
    clip has strong labels (has_frames), the frame is valid (frame_mask) and some valid phrase is
    active there (targets > 0). A per-clip scalar bias cancels in the softmax; a per-phrase one
    does not.

    frame_embeds (B, T, D), phrase_embeds (B, K, D): L2-normalised; frame_mask (B, T) bool;
    targets (B, T, K) in [0, 1]; phrase_mask (B, K) bool; has_frames (B,) bool; scale, bias:
    scalars / 0-dim, or per phrase slot (B, 1, K).
    Under DDP no features are exchanged (phrase sets are per clip); the frame count is
    all-reduced so the rank mean equals the global mean (see finelap.dist).
    Returns a 0-dim tensor (0, still attached to the graph, when no frame counts).
    """
    _check_dist(rank, world_size)
    b, t, d, k = check_phrase_set_shapes(frame_embeds, frame_mask, phrase_embeds, targets, phrase_mask, has_frames)
    dt = torch.float64 if frame_embeds.dtype == torch.float64 else torch.float32  # at least float32
    z = frame_logits(frame_embeds.to(dt), phrase_embeds.to(dt), scale, bias).to(dt)
    pm = phrase_mask.to(torch.bool)[:, None, :]
    # masked slots get the lowest finite logit: exp() is 0 there and a row of only masked slots stays finite
    logp = F.log_softmax(z.masked_fill(~pm, torch.finfo(z.dtype).min), dim=-1)
    y = targets.to(z.dtype) * pm
    pos = y.sum(-1)  # (B, T)
    counts = (pos > 0) & frame_mask.to(torch.bool) & has_frames.to(torch.bool)[:, None]
    q = y / pos.clamp_min(torch.finfo(z.dtype).tiny)[..., None]
    per_frame = -(q * logp).sum(-1)  # (B, T)
    w = counts.to(z.dtype)
    return _normalise((per_frame * w).sum(), w.sum(), world_size)


@register_objective
class FrameInfoNCEObjective(Objective):
    """`frame_info_nce` on the batch's phrase sets, with the model's frame scale and bias.

    Skipped when no rank has strong labels; under DDP computed on every rank as soon as one has
    (ranks without them take part with an empty phrase set), because the loss all-reduces.
    """

    name = "frame_infonce"
    slot = "frame"
    all_terms = ("frame/infonce",)
    frame_rows = "labelled"  # every frame term is weighted by has_frames
    needs = ("frame_embeds", "frame_mask", "has_frames", "phrase_embeds", "phrase_mask", "frame_targets",
             "frame_logit_scale", "frame_logit_bias")  # fmt: skip

    def gather(self, cfg: LossConfig, ctx: StepContext) -> dict[str, Any]:
        return {**frame_inputs(ctx), **phrase_inputs(ctx)}

    def compute(self, cfg: LossConfig, x: Inputs, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor | None]:
        present = phrase_set_present(x)
        if not any_rank(present, world_size, input_device(x)):
            return {}
        fe = self.need(x, "frame_embeds")
        fm = frame_mask_of(x, fe)
        scale, bias = self.need(x, "frame_logit_scale"), self.need(x, "frame_logit_bias")
        if present:
            pe, pm, tg, hf = self.need(x, "phrase_embeds"), self.need(x, "phrase_mask"), x["frame_targets"], x["has_frames"]
        else:
            pe, pm, tg, hf = empty_phrase_set(fe)
            if torch.is_tensor(scale) and scale.dim() == 3:  # per-slot (B, 1, K): no slots here
                scale, bias = scale[..., :0], bias[..., :0]
        return {"frame/infonce": frame_info_nce(fe, fm, pe, tg, pm, hf, scale, bias, rank, world_size)}
