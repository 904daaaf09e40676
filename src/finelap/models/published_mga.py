"""`finelap import mgaclap`: MGA-CLAP's released `model.pt` as a finelap checkpoint.

Facts read from Ming-er/MGA-CLAP (models/ase_model.py, models/htsat.py, models/text_encoder.py,
models/feature_extractor.py, settings/inference_*.yaml, zero_shot_*.py):

- `model.pt` is a pickle `{"model": ASE.state_dict(), ...}` (training also stores "optimizer",
  "config" as plain YAML data and "epoch"); all of it is read with weights_only=True.
- Audio: HTS-AT tiny (embed 96, depths 2/2/6/2, heads 4/8/16/32, window 8, spec 256) at
  `audio_encoder.audio_enc.*`, LAION-CLAP's HTS-AT names; front-end torchlibrosa (centred reflect-
  padded STFT 1024 / hop 320 at 32 kHz, periodic Hann, power 2, librosa slaney mel 64 bands
  50-14000 Hz, 10 log10(max(x, 1e-10)), no top-dB) whose weights are in the file and re-derived
  here. Frames come from the locality-aware block (`published.locality_aware_frames`): 32 per 10 s.
- Frame projection `frame_proj` = LayerNorm(768), Linear(768, 1024), GELU, LayerNorm(1024),
  Linear(1024, 1024); word projection `word_proj` likewise on BERT's last hidden states after
  [CLS] (bert-base-uncased without pooler, 30 tokens).
- Shared codebook `codebook` (4096, 1024); affinities <x, c_k> / sqrt(1024) / 1000 (T = 1000) on the
  *unnormalised* projections, the word mask (special tokens and padding) multiplied in before the
  max over steps, sparsemax over codewords, sum of codewords, then L2 normalisation.
- Clip logits <a, t> / temp (`temp`, a learnt scalar, 0.07 at init); frame scores in the authors'
  SED and grounding code are the cosine of normalised frame embeddings with the codebook text
  embedding (raw for SED, sigmoid(cos) for grounding).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .published import (
    _DERIVED_BUFFERS,
    IMPORTERS,
    Converted,
    SourceError,
    _front_end_audio,
    _htsat_config_from_state,
    _htsat_window_s,
    _spec_size_from_attn_mask,
    _strip_prefix,
    _text_config_from_dir,
    laion_to_hf_clap,
    read_pickle_state,
)

__all__ = ["convert_mgaclap", "MGA_FRONT", "MGA_PROMPT_TEMPLATE"]

MGA_FRONT = {"sample_rate": 32000, "n_fft": 1024, "hop_length": 320, "fmin": 50.0, "fmax": 14000.0}
# ESC-50 and VGGSound zero-shot prompts in zero_shot_classification.py (UrbanSound8K and the SED /
# grounding scripts use the bare class names or phrases)
MGA_PROMPT_TEMPLATE = "{} can be heard"

_AUDIO = "audio_encoder.audio_enc."
_TEXT = "text_encoder.text_encoder."
_NEED = ("codebook", "temp", "frame_proj.1.weight", "word_proj.1.weight", _AUDIO + "patch_embed.proj.weight")
# torchlibrosa's STFT/mel weights are re-derived by finelap's front-end
_AUDIO_DROP = re.compile(r"^audio_feats_extractor\.")


def _mga_state(obj: Any, src: Path) -> dict[str, torch.Tensor]:
    state = obj.get("model") if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) else obj
    if not isinstance(state, Mapping):
        raise SourceError(f"{src}: expected MGA-CLAP's {{'model': state_dict}}, got {type(state).__name__}")
    tensors = _strip_prefix({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, "module.")
    missing = [k for k in _NEED if k not in tensors]
    if missing:
        raise SourceError(f"{src}: not an MGA-CLAP checkpoint (missing {', '.join(missing[:3])})")
    return tensors


def convert_mgaclap(src: Path, text_model: Path | None) -> Converted:
    """MGA-CLAP `model.pt` (HTS-AT with the locality-aware block + bert-base-uncased + shared codebook);
    `text_model` = a local bert-base-uncased folder for the text tower's config and tokenizer."""
    if src.is_dir():
        raise SourceError(f"{src}: expected MGA-CLAP's model.pt, got a directory")
    if text_model is None:
        raise SourceError("mgaclap checkpoints need --text-model DIR (a local bert-base-uncased folder: config and tokenizer)")
    raw = _mga_state(read_pickle_state(src), src)

    audio: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if k.startswith(_AUDIO):
            name = k[len(_AUDIO):]
            if not _AUDIO_DROP.match(name):
                audio["audio_branch." + name] = v
        elif k.startswith(_TEXT):
            if not k.endswith(_DERIVED_BUFFERS):  # position_ids: the buffer MGA-CLAP#3's strict load trips on
                state["text.model." + k[len(_TEXT):]] = v
        elif k.startswith(("frame_proj.", "word_proj.")):
            which, rest = k.split(".", 1)
            state[f"{'clip_head' if which == 'frame_proj' else 'text_head'}.mlp.{rest}"] = v
        elif k == "codebook":
            state["codebook.codebook"] = v
        elif k != "temp":
            raise SourceError(f"{src}: unexpected MGA-CLAP parameter {k!r}")
    spec = _spec_size_from_attn_mask(audio)
    hf = laion_to_hf_clap(audio, src)  # LAION-CLAP's HTS-AT names -> transformers' ClapAudioModel
    for k, v in hf.items():
        state["audio.backend.model." + k[len("audio_model."):]] = v
    # the frame projection's first Linear reads the tower's width (and sets the config's hidden/projection sizes)
    audio_cfg = _htsat_config_from_state({**hf, "audio_projection.linear1.weight": raw["frame_proj.1.weight"]}, spec, src)

    temp = raw["temp"].reshape(()).double()
    if not temp > 0:
        raise SourceError(f"{src}: temp = {float(temp)} is not a positive temperature")
    log_scale = (-temp.log()).float()
    # clip logits <a, t> / temp; the frame stream was never trained with a scale of its own: it gets
    # the same one, bias 0 (sigmoid(cos / temp) orders frames as the authors' cos and sigmoid(cos) do)
    for head in ("clip_scale_bias", "frame_scale_bias"):
        state[f"{head}.log_scale"] = log_scale.clone()
        state[f"{head}.bias"] = torch.zeros(())

    codebook = raw["codebook"]
    embed = int(raw["frame_proj.4.weight"].shape[0]) if "frame_proj.4.weight" in raw else int(codebook.shape[1])
    if codebook.dim() != 2 or codebook.shape[1] != embed:
        raise SourceError(f"{src}: codebook {tuple(codebook.shape)} does not match the projections' width {embed}")
    text_cfg = _text_config_from_dir(text_model)
    width = int(raw["word_proj.1.weight"].shape[1])
    if int(getattr(text_cfg, "hidden_size", -1)) != width:
        raise SourceError(f"{text_model}: text model width {getattr(text_cfg, 'hidden_size', None)} does not match "
                          f"MGA-CLAP's word projection ({width}); use bert-base-uncased")  # fmt: skip

    sr, hop = MGA_FRONT["sample_rate"], MGA_FRONT["hop_length"]
    window_s = _htsat_window_s(audio_cfg, sr, hop, 10.0)
    fpw = _frames_per_window(audio_cfg)
    scale = math.exp(float(log_scale))
    model = {
        "audio_encoder": "htsat",
        "audio": {"config": audio_cfg, **MGA_FRONT, "mel_scale": "slaney", "window_s": window_s, "locality_aware": True},
        "text": {"path": "text", "pooling": "cls", "max_length": 30, "weights": "checkpoint", "pooler_layer": False},
        "embed_dim": embed,
        "clip_pooling": "mean",
        "clip_head_hidden": int(raw["frame_proj.1.weight"].shape[0]),
        "text_head_hidden": int(raw["word_proj.1.weight"].shape[0]),
        "frame_head": False,
        "head_activation": "gelu",
        "head_style": "ln_mlp",
        "codebook_size": int(codebook.shape[0]),
        "codebook_temperature": 1000.0,  # Modality_Shared_Codebook(T=1000.0)
        "codebook_inputs": "projected",
        "codebook_words": "words",
        "clip_scale_init": min(scale, 1e4),
        "frame_scale_init": min(scale, 1e4),
        "max_logit_scale": max(100.0, 2 * scale),
    }
    n_mels = int(audio_cfg.get("num_mel_bins", 64))
    run_config = {
        "preset": "mgaclap",
        "name": "mgaclap-import",
        "model": model,
        "audio": _front_end_audio(sr, MGA_FRONT["n_fft"], hop, n_mels, MGA_FRONT["fmin"], MGA_FRONT["fmax"], window_s),
        "loss": {"clip": "hard_negative", "frame": None},
        # zero_shot_sed.py median-filters the frame scores over 3 frames (of 10 s / 32 in the release)
        "eval": {"prompt_template": MGA_PROMPT_TEMPLATE, "median_filter_s": 3 * window_s / fpw},
    }
    notes = [] if any(k.endswith("attn_mask") for k in audio) else ["spec_size not recorded in the checkpoint; assumed HTS-AT's 256"]
    return Converted(run_config, state, text_cfg, text_model, notes)


def _frames_per_window(audio_cfg: Mapping[str, Any]) -> int:
    spec, n_mels = int(audio_cfg.get("spec_size", 256)), int(audio_cfg.get("num_mel_bins", 64))
    stride = audio_cfg.get("patch_stride", 4)
    stride_t = stride if isinstance(stride, int) else int(stride[1])
    return (spec // stride_t // 2 ** (len(audio_cfg.get("depths", [2, 2, 6, 2])) - 1)) * (spec // n_mels)


IMPORTERS["mgaclap"] = convert_mgaclap
