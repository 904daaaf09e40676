"""HEAR 2021 common API, so finelap checkpoints plug into hear-eval-kit and other HEAR tooling.

    import finelap.hear as hear
    model = hear.load_model("runs/finelap/final")            # a checkpoint directory
    scene = hear.get_scene_embeddings(audio, model)           # (n_sounds, D)
    emb, ts = hear.get_timestamp_embeddings(audio, model)     # (n_sounds, T, D), (n_sounds, T) in ms

`audio` is a float tensor (n_sounds, n_samples) in [-1, 1] at `model.sample_rate`. Scene
embeddings are the model's clip embeddings (long audio: the deterministic window average of
`Pipeline.embed_audio`); timestamp embeddings are its frame embeddings in the shared audio-text
space, one per encoder frame (40 ms hop with the default encoder), with timestamps at the frame
centres from the model's Timeline. Outputs are float32 tensors on the audio's device.

HEAR calls `load_model(model_file_path)` with one path; an empty path falls back to the
environment variable FINELAP_CHECKPOINT (finelap ships no default weights).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, FinelapError

__all__ = ["HearModel", "load_model", "get_scene_embeddings", "get_timestamp_embeddings"]


class HearModel(torch.nn.Module):
    """The HEAR model object: a torch Module (so `.to(device)` moves the weights) with the
    attributes HEAR requires: sample_rate, scene_embedding_size, timestamp_embedding_size."""

    def __init__(self, pipeline: Any) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.model = pipeline.model  # registered as a submodule: .to()/.cuda() move it
        self.sample_rate = int(pipeline.sample_rate)
        self.scene_embedding_size = int(pipeline.embed_dim)
        self.timestamp_embedding_size = int(pipeline.embed_dim)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return get_scene_embeddings(audio, self)


def load_model(model_file_path: str = "", device: str = "cpu", **pipeline_kwargs: Any) -> HearModel:
    """Load a finelap checkpoint directory (or a run directory) as a HEAR model.

    An empty path uses $FINELAP_CHECKPOINT. Raises CheckpointError when neither names a checkpoint.
    """
    from .infer import Pipeline

    path = model_file_path or os.environ.get("FINELAP_CHECKPOINT", "")
    if not path:
        raise CheckpointError(
            "finelap has no built-in weights: pass a checkpoint directory to load_model(), "
            "or set FINELAP_CHECKPOINT"
        )
    return HearModel(Pipeline.from_pretrained(path, device=device, **pipeline_kwargs))


def _check(audio: Any, model: HearModel) -> torch.Tensor:
    if not isinstance(model, HearModel):
        raise TypeError(f"model must come from finelap.hear.load_model(), got {type(model).__name__}")
    if not isinstance(audio, torch.Tensor):
        audio = torch.as_tensor(np.asarray(audio))
    if audio.dim() != 2:
        raise FinelapError(f"audio must be a (n_sounds, n_samples) tensor, got shape {tuple(audio.shape)}")
    if audio.shape[0] == 0 or audio.shape[1] == 0:
        raise FinelapError(f"audio must hold at least one sound with at least one sample, got shape {tuple(audio.shape)}")
    return audio


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """audio (n_sounds, n_samples) at model.sample_rate -> (n_sounds, scene_embedding_size) float32."""
    audio = _check(audio, model)
    rows = audio.detach().float().cpu().numpy()
    # HEAR's (n_sounds, n_samples) is a batch of mono sounds: Pipeline takes a batch as a list
    # (a 2-D array there is one multichannel clip), at the model's rate by HEAR's contract
    pipe = model.pipeline
    emb = pipe.embed_audio(list(rows), sample_rate=pipe.sample_rate)
    return torch.from_numpy(emb).to(audio.device)


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """audio (n_sounds, n_samples) -> (embeddings (n_sounds, T, timestamp_embedding_size),
    timestamps (n_sounds, T) in milliseconds, the centre of each frame)."""
    audio = _check(audio, model)
    pipe = model.pipeline
    emb = pipe._frame_embeds_batch(audio.detach().float().cpu().numpy())
    t = emb.shape[1]
    centres_ms = np.asarray(pipe.timeline.frame_center(np.arange(t)), dtype=np.float64) * 1000.0
    ts = torch.from_numpy(centres_ms.astype(np.float32)).expand(audio.shape[0], t).contiguous()
    return torch.from_numpy(emb).to(audio.device), ts.to(audio.device)
