"""The seeds' published models inside finelap: their audio towers as registered encoders, and the
importers that turn a downloaded release into a normal finelap checkpoint directory.

Encoders (frames first, like every finelap encoder):
- "htsat": the HTS-AT Swin tower of LAION-CLAP (and OpenFLAM), built from its config with
  transformers' `ClapAudioModel`; the log-mel front-end of the original code (reflect-padded STFT,
  slaney mel for non-fusion models, HTK mel for fusion models). 10-s windows on a fixed grid.

Importers (`import_checkpoint(kind, src, text_model, out)`):
- "laion-clap": LAION-CLAP `.pt` training checkpoints (`{"state_dict": ...}`, `module.` prefixes,
  fusion and non-fusion) and the Hugging Face `ClapModel` layout (a folder with config.json).
- "flam": OpenFLAM's `open_flam_oct17.pth`.
- "finelap": FineLAP's `finelap_fixed.pt` (`{'model': state_dict}`): EAT (`models.eat`) + RoBERTa +
  the decoupled projector (clip MLP on CLS, post-norm transformer frame head).

Nothing downloads. Pickled sources are read with `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers; no remote code is run.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..audio import Timeline, mel_filterbank
from ..errors import CheckpointError, ConfigError, FinelapError
from .audio_encoders import AudioEncoder, PublishedWindowEncoder, _WindowBackend
from .eat import heads_for_width
from .encoder_registry import AudioEncoderOptions, register_audio_encoder

__all__ = [
    "SourceError",
    "htk_mel_filterbank",
    "ReferenceLogMel",
    "HTSATEncoder",
    "IMPORTERS",
    "import_checkpoint",
    "read_pickle_state",
    "laion_to_hf_clap",
]


class SourceError(CheckpointError):
    """A source checkpoint that cannot be imported (wrong format, unknown keys, missing tensors)."""


# ============================================================================ front-end


def _hz_to_mel_htk(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def htk_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """HTK-scale triangular filters without area normalisation, (n_mels, n_fft//2+1) float64: the
    filterbank of torchaudio's MelSpectrogram defaults, which LAION-CLAP's fusion models were trained on."""
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    hz = _mel_to_hz_htk(np.linspace(_hz_to_mel_htk(fmin), _hz_to_mel_htk(fmax), n_mels + 2))
    fdiff = np.diff(hz)
    ramps = hz[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    return np.maximum(0.0, np.minimum(lower, upper))


class ReferenceLogMel(nn.Module):
    """The log-mel of LAION-CLAP / HTS-AT: centred STFT with *reflect* padding, periodic Hann window,
    power 2, mel projection ("slaney": librosa's area-normalised filters, "htk": torchaudio's),
    10*log10(max(x, 1e-10)), no top-dB clamp.

    forward(wave (K, N)) -> (K, 1 + N // hop, n_mels) float32 dB (time first, as HTS-AT takes it).
    Computed in float64: the reference implementations are float64 numpy / librosa.
    """

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, fmin: float, fmax: float, mel_scale: str = "slaney") -> None:
        super().__init__()
        if mel_scale not in ("slaney", "htk"):
            raise ConfigError(f"mel_scale must be 'slaney' or 'htk', got {mel_scale!r}")
        if not 0 <= fmin < fmax <= sample_rate / 2:
            raise ConfigError(f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={fmin}, fmax={fmax}, sample_rate={sample_rate}")
        self.n_fft, self.hop_length = int(n_fft), int(hop_length)
        make = mel_filterbank if mel_scale == "slaney" else htk_mel_filterbank
        self.register_buffer("fb", torch.from_numpy(make(sample_rate, n_fft, n_mels, fmin, fmax)), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True, dtype=torch.float64), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave.to(torch.float64)
        pad = self.n_fft // 2
        if x.shape[-1] <= pad:  # reflect padding needs more samples than the pad; zeros are what silence is
            x = torch.nn.functional.pad(x, (0, pad + 1 - x.shape[-1]))
        x = torch.nn.functional.pad(x[:, None], (pad, pad), mode="reflect")[:, 0]
        spec = torch.stft(x, self.n_fft, self.hop_length, window=self.window.to(x.device), center=False, return_complex=True)
        power = spec.real.square() + spec.imag.square()  # (K, F, T)
        mel = torch.matmul(self.fb.to(x.device), power)
        db = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
        return db.transpose(1, 2).to(torch.float32)


# ============================================================================ HTS-AT


def locality_aware_frames(encoder: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """MGA-CLAP's locality-aware block on transformers' ClapAudioEncoder: the frames of the *value
    path* of the last Swin block, given that block's input h (K, L, C) -> (K, T', C).

    What MGA-CLAP's htsat.py changes in plain HTS-AT (read from Ming-er/MGA-CLAP): the last block
    also returns v1 = h + proj(value(norm1(h))) (window attention replaced by each token's own value,
    so no token mixing) and v2 = v1 + norm2(v1) (the feed-forward replaced by its LayerNorm, added
    residually); the final LayerNorm and HTS-AT's token-semantic regrouping then make frames of v2
    exactly as of the usual output, averaged over frequency. The usual path is left unchanged.
    """
    blk = encoder.layers[-1].blocks[-1]
    v = h + blk.attention.output.dense(blk.attention.self.value(blk.layernorm_before(h)))
    v = encoder.norm(v + blk.layernorm_after(v))
    f, t = encoder.input_resolutions[-1]
    k, _, c = v.shape
    ratio = encoder.freq_ratio
    grid = v.transpose(1, 2).reshape(k, c, ratio, f // ratio, t)  # HTS-AT's group-2D layout: freq_ratio time blocks stacked in F
    return grid.permute(0, 1, 3, 2, 4).reshape(k, c, f // ratio, ratio * t).mean(2).transpose(1, 2)


class _HTSATBackend(_WindowBackend):
    """transformers' ClapAudioModel (HTS-AT) on fixed windows of `window_samples`; frames are the
    token-semantic grid before pooling (last_hidden_state (K, C, F', T') averaged over F'), or, with
    `locality_aware`, MGA-CLAP's locality-aware frames (`locality_aware_frames`)."""

    def __init__(self, model: nn.Module, config: Any, frontend: ReferenceLogMel, sample_rate: int, window_samples: int,
                 locality_aware: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.frontend = frontend
        self.fusion = bool(config.enable_fusion)
        self.locality_aware = bool(locality_aware)
        # the last block's input, per thread (Pipeline encodes windows on several threads at once)
        self._last_block_input: dict[int, torch.Tensor] = {}
        if self.locality_aware:
            model.audio_encoder.layers[-1].blocks[-1].register_forward_pre_hook(self._keep_last_block_input)
        stride_t = config.patch_stride if isinstance(config.patch_stride, int) else config.patch_stride[1]
        freq_ratio = config.spec_size // config.num_mel_bins
        self.frames_per_window = (config.spec_size // stride_t // 2 ** (len(config.depths) - 1)) * freq_ratio
        max_mel = config.spec_size * freq_ratio  # HTS-AT refuses more mel frames than this
        if 1 + window_samples // frontend.hop_length > max_mel:
            raise ConfigError(
                f"HTS-AT window of {window_samples} samples makes {1 + window_samples // frontend.hop_length} mel frames; "
                f"the model takes at most {max_mel} (spec_size {config.spec_size} x freq_ratio {freq_ratio})"
            )
        if window_samples % self.frames_per_window:
            raise ConfigError(f"HTS-AT window of {window_samples} samples does not split into {self.frames_per_window} frames")
        self.window_samples = self.step_samples = int(window_samples)
        spf = self.window_samples // self.frames_per_window
        self.timeline = Timeline(frame_rate_hz=sample_rate / spf, sample_rate=sample_rate, hop_length=spf, downsample=1)
        self.dim = int(config.patch_embeds_hidden_size * 2 ** (len(config.depths) - 1))

    def features(self, chunks: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.frontend(chunks)[:, None]  # (K, 1, T, F)
        if self.fusion:
            # a window is never longer than the model's clip: LAION-CLAP then feeds the same mel
            # four times with is_longer False (only the global channel reaches the patch embedding)
            return {"input_features": x.repeat(1, 4, 1, 1), "is_longer": torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device)}
        return {"input_features": x}

    def _keep_last_block_input(self, module: nn.Module, args: tuple) -> None:
        self._last_block_input[threading.get_ident()] = args[0]

    def run(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model(**feats)
        if self.locality_aware:
            h = self._last_block_input.pop(threading.get_ident())
            return locality_aware_frames(self.model.audio_encoder, h), out.pooler_output  # type: ignore[arg-type]
        return out.last_hidden_state.mean(2).transpose(1, 2), out.pooler_output  # (K, T', C), (K, C)


@dataclass(kw_only=True)
class HTSATOptions(AudioEncoderOptions):
    """`model.audio` of "htsat" (see `HTSATEncoder`): `config` (ClapAudioConfig fields) is required."""

    config: dict
    sample_rate: int = 48000
    n_fft: int = 1024
    hop_length: int = 480
    fmin: float = 50.0
    fmax: float = 14000.0
    mel_scale: str = "slaney"
    window_s: float = 10.0
    window_batch: int = 16
    locality_aware: bool = False


@register_audio_encoder("htsat", options=HTSATOptions)
class HTSATEncoder(PublishedWindowEncoder):
    """HTS-AT (LAION-CLAP's and OpenFLAM's audio tower) built from its config, weights from a finelap
    checkpoint. Frames: the last stage's token grid averaged over frequency, `frames_per_window`
    per `window_s` window (32 per 10 s at 48 kHz: 3.2 Hz); audio of any length is encoded on a
    fixed grid of windows (the HF adapter's machinery).

    config: `transformers.ClapAudioConfig` fields (depths, heads, spec_size, enable_fusion, ...).
    sample_rate, n_fft, hop_length, fmin, fmax, mel_scale: the original front-end (n_mels is the
    config's num_mel_bins). window_s: the model's clip length. locality_aware: frames from
    MGA-CLAP's locality-aware block (the value path of the last Swin block) instead of its output.

    A frame is valid when it starts before the end of the audio (ceil(n / samples_per_frame)
    frames), so a 10-s clip has exactly the 32 frames of one window and its clip embedding is
    the reference model's pooled output; the Timeline's extra frame at exactly 10 s is masked.
    """

    def __init__(
        self,
        config: dict,
        sample_rate: int = 48000,
        n_fft: int = 1024,
        hop_length: int = 480,
        fmin: float = 50.0,
        fmax: float = 14000.0,
        mel_scale: str = "slaney",
        window_s: float = 10.0,
        freeze: bool = False,
        lr_mult: float = 1.0,
        window_batch: int = 16,
        locality_aware: bool = False,
    ) -> None:
        AudioEncoder.__init__(self, freeze=False, lr_mult=lr_mult)
        from transformers import ClapAudioConfig, ClapAudioModel

        if not isinstance(config, Mapping):
            raise ConfigError(f"htsat: config must be a mapping of ClapAudioConfig fields, got {type(config).__name__}")
        try:
            cfg = ClapAudioConfig(**dict(config))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"htsat: bad config ({e})") from None
        frontend = ReferenceLogMel(sample_rate, n_fft, hop_length, int(cfg.num_mel_bins), fmin, fmax, mel_scale)
        backend = _HTSATBackend(ClapAudioModel(cfg), cfg, frontend, sample_rate, int(round(window_s * sample_rate)), locality_aware)
        self._adopt(backend, "htsat", window_batch, freeze)


# ============================================================================ reading sources


def read_pickle_state(path: Path, allowed: tuple = ()) -> Any:
    """torch.load(path, weights_only=True) with `allowed` extra globals; a clear one-line error when
    the file needs anything else (we never unpickle arbitrary objects)."""
    try:
        if allowed:
            with torch.serialization.safe_globals(list(allowed)):
                return torch.load(str(path), map_location="cpu", weights_only=True)
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SourceError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SourceError(f"{path}: is a directory, expected a checkpoint file") from None
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip/pickle), ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {msg}); "
            "finelap does not unpickle arbitrary objects"
        ) from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise SourceError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _tensor_state(obj: Any, path: Path, key: str = "state_dict") -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint (`{key: {...}}` or the dict itself), without DDP's
    `module.` prefix."""
    state = obj.get(key) if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping) else obj
    if not isinstance(state, Mapping) or not state:
        raise SourceError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SourceError(f"{path}: holds no tensors")
    return _strip_prefix(tensors, "module.")


# ============================================================================ LAION-CLAP

# deterministic buffers that the target modules create themselves (never taken from a source)
_DERIVED_BUFFERS = ("relative_position_index", "embeddings.position_ids", "embeddings.token_type_ids", "attn_mask")

# LAION-CLAP HTS-AT block names -> transformers' ClapAudio names (qkv is split separately)
_LAION_BLOCK_RENAMES = (
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("attn.proj.", "attention.output.dense."),
    ("attn.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)
# training-only or re-derived parts of a LAION-CLAP checkpoint
_LAION_DROP = re.compile(
    r"^(audio_branch\.(spectrogram_extractor|logmel_extractor|tscam_conv|head|spec_augmenter)\.|"
    r"audio_branch\.head\.|audio_transform\.|text_transform\.|logit_scale_t$)"
)


def laion_to_hf_clap(state: Mapping[str, torch.Tensor], path: Path | str = "checkpoint") -> dict[str, torch.Tensor]:
    """LAION-CLAP (HTS-AT + RoBERTa) parameter names -> transformers' `ClapModel` names.

    Rules read from LAION-CLAP's htsat.py/model.py and transformers' modeling_clap.py: audio_branch ->
    audio_model.audio_encoder, bn0 -> batch_norm, Swin block norm1/norm2/attn/mlp -> layernorm_before/
    layernorm_after/attention/intermediate+output, fused qkv -> query/key/value, text_branch ->
    text_model, projections' Sequential indices 0/2 -> linear1/linear2. Spectrogram/mel extractor
    weights, the AudioSet tagging head (tscam_conv, head), the MLP-loss transforms and
    logit_scale_t are training-only and dropped; deterministic buffers are re-created.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if _LAION_DROP.match(k) or k.endswith(_DERIVED_BUFFERS):
            continue
        if k.startswith("audio_branch."):
            name = k[len("audio_branch."):]
            if name.startswith("absolute_pos_embed"):
                raise SourceError(f"{path}: HTS-AT with absolute position embeddings (ape=True) is not supported")
            if name.startswith("bn0."):
                name = "batch_norm." + name[4:]
            m = re.match(r"^(layers\.\d+\.blocks\.\d+\.)(.*)$", name)
            if m:
                head, rest = m.groups()
                if rest.startswith("attn.qkv."):
                    kind = rest.split(".")[-1]
                    if v.shape[0] % 3:
                        raise SourceError(f"{path}: {k} has {v.shape[0]} rows, not 3 x dim")
                    for part, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                        out[f"audio_model.audio_encoder.{head}attention.self.{part}.{kind}"] = t.clone()
                    continue
                for a, b in _LAION_BLOCK_RENAMES:
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                        break
                name = head + rest
            out["audio_model.audio_encoder." + name] = v
        elif k.startswith("text_branch."):
            out["text_model." + k[len("text_branch."):]] = v
        elif re.match(r"^(audio|text)_projection\.[02]\.", k):
            which, idx, rest = k.split(".", 2)
            out[f"{which}.linear{1 if idx == '0' else 2}.{rest}"] = v
        elif k == "logit_scale_a":
            out[k] = v
        else:
            raise SourceError(f"{path}: unexpected LAION-CLAP parameter {k!r} (not an HTS-AT + RoBERTa CLAP checkpoint?)")
    return out


def _htsat_config_from_state(hf: Mapping[str, torch.Tensor], spec_size: int, path: Path | str) -> dict[str, Any]:
    """ClapAudioConfig fields read off the tensor shapes of a ClapModel-named state dict."""
    pre = "audio_model.audio_encoder."
    try:
        proj = hf[pre + "patch_embed.proj.weight"]
        bn = hf[pre + "batch_norm.weight"]
        lin1 = hf["audio_projection.linear1.weight"]
    except KeyError as e:
        raise SourceError(f"{path}: no HTS-AT audio tower found (missing {e.args[0]})") from None
    depths: dict[int, int] = {}
    heads: dict[int, int] = {}
    window = None
    mlp_ratio = 4.0
    for k, v in hf.items():
        m = re.match(rf"^{re.escape(pre)}layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.relative_position_bias_table$", k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            depths[i] = max(depths.get(i, 0), j + 1)
            heads[i] = int(v.shape[1])
            window = int(round((math.sqrt(v.shape[0]) + 1) / 2))
        if k == pre + "layers.0.blocks.0.intermediate.dense.weight":
            mlp_ratio = v.shape[0] / v.shape[1]
    if not depths or window is None:
        raise SourceError(f"{path}: no Swin blocks found in the HTS-AT tower")
    n = len(depths)
    fusion = any(k.startswith(pre + "patch_embed.fusion_model.") for k in hf)
    return {
        "window_size": window,
        "num_mel_bins": int(bn.shape[0]),
        "spec_size": int(spec_size),
        "patch_size": int(proj.shape[-1]),
        "patch_stride": [int(proj.shape[-2]), int(proj.shape[-1])],
        "patch_embeds_hidden_size": int(proj.shape[0]),
        "hidden_size": int(lin1.shape[1]),
        "projection_dim": int(lin1.shape[0]),
        "depths": [depths[i] for i in range(n)],
        "num_attention_heads": [heads[i] for i in range(n)],
        "enable_fusion": fusion,
        "fusion_type": "aff_2d" if fusion else None,
        "mlp_ratio": float(mlp_ratio),
        "enable_patch_layer_norm": (pre + "patch_embed.norm.weight") in hf,
        "qkv_bias": (pre + "layers.0.blocks.0.attention.self.query.bias") in hf,
        "hidden_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def _htsat_window_s(audio_cfg: Mapping[str, Any], sample_rate: int, hop: int, clip_s: float) -> float:
    """The model's clip (10 s for the releases), shortened when HTS-AT's input grid cannot hold it
    (spec_size x freq_ratio mel frames) and cut to whole frames of the token grid."""
    spec, n_mels = int(audio_cfg.get("spec_size", 256)), int(audio_cfg.get("num_mel_bins", 64))
    stride = audio_cfg.get("patch_stride", 4)
    stride_t = stride if isinstance(stride, int) else int(stride[1])
    ratio = spec // n_mels
    fpw = (spec // stride_t // 2 ** (len(audio_cfg.get("depths", [2, 2, 6, 2])) - 1)) * ratio
    window = min(int(round(clip_s * sample_rate)), (spec * ratio - 1) * hop)
    return (window - window % fpw) / sample_rate


def _spec_size_from_attn_mask(state: Mapping[str, torch.Tensor], default: int = 256) -> int:
    """HTS-AT's spec_size is not a weight, but a shifted-window block's attn_mask buffer (nW, w*w,
    w*w) in the first stage gives it: nW = (spec_size / patch_stride / w)^2."""
    for k, v in state.items():
        m = re.match(r"^(module\.)?audio_branch\.layers\.0\.blocks\.\d+\.attn_mask$", k)
        if m and v.dim() == 3:
            w = int(round(math.sqrt(v.shape[1])))
            proj = next((t for n, t in state.items() if n.endswith("audio_branch.patch_embed.proj.weight")), None)
            stride = int(proj.shape[-1]) if proj is not None else 4
            return int(round(math.sqrt(v.shape[0]))) * w * stride
    return default


def _hf_clap_to_finelap(hf: Mapping[str, torch.Tensor], path: Path | str) -> dict[str, torch.Tensor]:
    """ClapModel names -> FineLAPModel names (HTS-AT encoder "htsat", coupled ReLU heads, text tower)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in hf.items():
        if k.endswith(_DERIVED_BUFFERS) or k == "logit_scale_t":
            continue
        if k.startswith("audio_model."):
            out["audio.backend.model." + k[len("audio_model."):]] = v
        elif k.startswith("text_model."):
            out["text.model." + k[len("text_model."):]] = v
        elif k.startswith(("audio_projection.", "text_projection.")):
            which, lin, rest = k.split(".", 2)
            head = "clip_head" if which == "audio_projection" else "text_head"
            out[f"{head}.mlp.{0 if lin == 'linear1' else 3}.{rest}"] = v
        elif k == "logit_scale_a":
            # CLIP-style temperature, no bias. The frame stream was never trained upstream: it gets
            # the same scale and bias 0 (ranks frames; calibrate before thresholding)
            out["clip_scale_bias.log_scale"] = v.reshape(())
            out["clip_scale_bias.bias"] = torch.zeros(())
            out["frame_scale_bias.log_scale"] = v.reshape(()).clone()
            out["frame_scale_bias.bias"] = torch.zeros(())
        else:
            raise SourceError(f"{path}: unexpected ClapModel parameter {k!r}")
    return out


@dataclass
class Converted:
    """What an importer produces: a RunConfig dict, the FineLAPModel state dict, and the text tower's
    HF config (saved with the tokenizer in the checkpoint's `text/` folder)."""

    run_config: dict[str, Any]
    state: dict[str, torch.Tensor]
    text_config: Any
    tokenizer_dir: Path
    notes: list[str]


def _roberta_config_from_clap(tc: Any) -> Any:
    from transformers import RobertaConfig

    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
            "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id")
    d = {k: getattr(tc, k) for k in keep if hasattr(tc, k)}
    return RobertaConfig(**d, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _text_config_from_dir(text_model: Path) -> Any:
    from transformers import AutoConfig

    if not (text_model / "config.json").is_file():
        raise SourceError(f"{text_model}: not a Hugging Face text model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(text_model), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise SourceError(f"{text_model}: cannot read config.json ({type(e).__name__}: {e})") from None


def _front_end_audio(sample_rate: int, n_fft: int, hop: int, n_mels: int, fmin: float, fmax: float, clip_s: float) -> dict[str, Any]:
    # the RunConfig's audio section documents the front-end (config.json "preprocessing"); the
    # encoder holds the same numbers and is what actually computes features
    return {"sample_rate": sample_rate, "n_fft": n_fft, "win_length": n_fft, "hop_length": hop, "n_mels": n_mels,
            "fmin": fmin, "fmax": fmax, "clip_seconds": clip_s, "max_seconds": max(30.0, clip_s)}


def convert_laion_clap(src: Path, text_model: Path | None) -> Converted:
    """LAION-CLAP `.pt` (HTS-AT + RoBERTa; `text_model` = a local roberta-base folder for its config
    and tokenizer) or a Hugging Face ClapModel folder (its own tokenizer unless `text_model` is given)."""
    notes: list[str] = []
    front = {"sample_rate": 48000, "n_fft": 1024, "hop_length": 480, "fmin": 50.0, "fmax": 14000.0}
    window_s = 10.0
    if src.is_dir():
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(str(src), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise SourceError(f"{src}: cannot read config.json ({type(e).__name__}: {e})") from None
        if cfg.model_type != "clap":
            raise SourceError(f"{src}: config.json has model_type {cfg.model_type!r}, expected 'clap'")
        weights = src / "model.safetensors"
        if weights.is_file():
            hf = _read_safetensors(weights)
        elif (src / "pytorch_model.bin").is_file():
            hf = _tensor_state(read_pickle_state(src / "pytorch_model.bin"), src / "pytorch_model.bin")
        else:
            raise SourceError(f"{src}: no model.safetensors or pytorch_model.bin")
        audio_cfg = {k: v for k, v in cfg.audio_config.to_dict().items() if k in _CLAP_AUDIO_FIELDS}
        audio_cfg.update(hidden_dropout_prob=0.0, drop_path_rate=0.0, attention_probs_dropout_prob=0.0)
        text_cfg = _roberta_config_from_clap(cfg.text_config)
        pp = src / "preprocessor_config.json"
        if pp.is_file():
            import json

            p = json.loads(pp.read_text(encoding="utf-8"))
            front = {"sample_rate": int(p.get("sampling_rate", 48000)), "n_fft": int(p.get("fft_window_size", 1024)),
                     "hop_length": int(p.get("hop_length", 480)), "fmin": float(p.get("frequency_min", 50.0)),
                     "fmax": float(p.get("frequency_max", 14000.0))}
            window_s = float(p.get("max_length_s", 10))
        tok_dir = text_model or src
    else:
        if text_model is None:
            raise SourceError("laion-clap .pt checkpoints need --text-model DIR (a local roberta-base folder: config and tokenizer)")
        raw = _tensor_state(read_pickle_state(src), src)
        spec = _spec_size_from_attn_mask(raw)
        hf = laion_to_hf_clap(raw, src)
        audio_cfg = _htsat_config_from_state(hf, spec, src)
        text_cfg = _text_config_from_dir(text_model)
        tok_dir = text_model
        if spec == 256 and not any(k.endswith("attn_mask") for k in raw):
            notes.append("spec_size not recorded in the checkpoint; assumed HTS-AT's 256")
    state = _hf_clap_to_finelap(hf, src)
    run_config = _clap_like_run_config("laion-clap", hf, audio_cfg, front, window_s)
    run_config["loss"] = {"clip": "infonce", "frame": None}
    run_config["eval"] = {"prompt_template": "This is a sound of {}."}
    return Converted(run_config, state, text_cfg, tok_dir, notes)


def _clap_like_run_config(kind: str, hf: Mapping[str, torch.Tensor], audio_cfg: dict[str, Any], front: dict[str, Any],
                          clip_s: float) -> dict[str, Any]:  # fmt: skip
    """RunConfig sections shared by the HTS-AT + RoBERTa CLAP family (LAION-CLAP, OpenFLAM): the
    `htsat` encoder with the original front-end, coupled ReLU projection heads, RoBERTa pooler."""
    fusion = bool(audio_cfg.get("enable_fusion"))
    n_mels = int(audio_cfg.get("num_mel_bins", 64))
    window_s = _htsat_window_s(audio_cfg, front["sample_rate"], front["hop_length"], clip_s)
    proj_dim = int(hf["audio_projection.linear1.weight"].shape[0])
    model = {
        "audio_encoder": "htsat",
        "audio": {"config": audio_cfg, **front, "mel_scale": "htk" if fusion else "slaney", "window_s": window_s},
        "text": {"path": "text", "pooling": "pooler", "max_length": 77, "weights": "checkpoint"},
        "embed_dim": proj_dim,
        "clip_pooling": "mean",
        "clip_head_hidden": proj_dim,
        "text_head_hidden": proj_dim,
        "frame_head": False,
        "head_activation": "relu",
        "clip_scale_init": 10.0,
        "frame_scale_init": 10.0,
    }
    return {
        "preset": kind,
        "name": f"{kind}-import",
        "model": model,
        "audio": _front_end_audio(front["sample_rate"], front["n_fft"], front["hop_length"], n_mels, front["fmin"], front["fmax"], window_s),
    }


_FLAM_EXTRA = re.compile(r"^(aed_logit_scale$|fc_per_text_logit_(scale|bias)\.)")
_FLAM_FRONT = {"sample_rate": 48000, "n_fft": 1024, "hop_length": 480, "fmin": 50.0, "fmax": 14000.0}


def convert_flam(src: Path, text_model: Path | None) -> Converted:
    """OpenFLAM `open_flam_oct17.pth` (a plain state dict): LAION-CLAP's HTS-AT + RoBERTa layout plus
    the per-text logit scale/bias MLPs (`fc_per_text_logit_scale` / `_bias`, Linear-GELU-Linear on
    the RoBERTa pooler output) and `aed_logit_scale` (fixed at 0, unused at inference)."""
    if src.is_dir():
        raise SourceError(f"{src}: expected the OpenFLAM checkpoint file (open_flam_oct17.pth), got a directory")
    if text_model is None:
        raise SourceError("flam checkpoints need --text-model DIR (a local roberta-base folder: config and tokenizer)")
    raw = _tensor_state(read_pickle_state(src), src)
    extra = {k: raw.pop(k) for k in list(raw) if _FLAM_EXTRA.match(k)}
    need = [f"fc_per_text_logit_{w}.{i}.{p}" for w in ("scale", "bias") for i in (0, 2) for p in ("weight", "bias")]
    missing = [k for k in need if k not in extra]
    if missing:
        raise SourceError(f"{src}: not an OpenFLAM checkpoint (missing {', '.join(missing[:3])})")
    spec = _spec_size_from_attn_mask(raw)
    hf = laion_to_hf_clap(raw, src)
    audio_cfg = _htsat_config_from_state(hf, spec, src)
    state = {k: v for k, v in _hf_clap_to_finelap(hf, src).items() if not k.startswith("frame_scale_bias.")}
    for w, name in (("scale", "scale_mlp"), ("bias", "bias_mlp")):
        for i in (0, 2):
            for p in ("weight", "bias"):
                state[f"frame_scale_bias.{name}.{i}.{p}"] = extra[f"fc_per_text_logit_{w}.{i}.{p}"]
    run_config = _clap_like_run_config("flam", hf, audio_cfg, dict(_FLAM_FRONT), 10.0)
    run_config["model"].update(
        text_conditioned_scale_bias=True, scale_bias_input="pooled",
        scale_bias_hidden=int(extra["fc_per_text_logit_scale.0.weight"].shape[0]),
        max_logit_scale=1e4,  # FLAM's per-text scales are exp(MLP) without a cap; don't clamp them
    )  # fmt: skip
    run_config["loss"] = {"clip": "infonce", "frame": "flam"}
    # OpenFLAM's SED example: raw phrases as text, unbiased scores, median filter of 3 frames (3.2 Hz)
    run_config["eval"] = {"prompt_template": "{}", "median_filter_s": 3 / 3.2}
    notes = [] if any(k.endswith("attn_mask") for k in raw) else ["spec_size not recorded in the checkpoint; assumed HTS-AT's 256"]
    return Converted(run_config, state, _text_config_from_dir(text_model), text_model, notes)


# ============================================================================ FineLAP

_FL_EAT = "audio_encoder.audio_enc.model."
# training-only parts of the FineLAP checkpoint: EAT's AudioSet classifier (fc_norm, head), the
# data2vec teacher and decoders, the utterance-level (CLS) loss projection and centre
_FL_DROP = re.compile(
    r"^audio_encoder\.audio_enc\.(fc_norm|head)\.|"
    r"^audio_encoder\.audio_enc\.model\.(_ema|ema\.|shared_decoder\.|recon_proj\.|cls_proj\.|center$|"
    r"modality_encoders\.IMAGE\.decoder\.)"
)
_FL_BLOCK_PARTS = {"attn.qkv": "qkv", "attn.proj": "proj", "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
_FL_PREFIXES = ("", "module.", "model.", "finelap.", "model.finelap.")


def _finelap_state(src: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The FineLAP state dict from `finelap_fixed.pt` ({'model': state_dict}, read weights-only),
    a `.safetensors` file, or a folder holding either; and a word for the layout."""
    path = src
    if src.is_dir():
        cands = [src / n for n in ("model.safetensors", "finelap_fixed.pt")] + sorted(src.glob("*.safetensors")) + sorted(src.glob("*.pt"))
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise SourceError(f"{src}: no model.safetensors or finelap_fixed.pt in this folder")
        path = found
    if path.suffix == ".safetensors":
        raw, layout = _read_safetensors(path), "safetensors"
    else:
        try:
            obj = read_pickle_state(path)
        except SourceError as e:  # e.g. a training config pickled as custom objects next to the weights
            raise SourceError(
                f"{e}. If you trust the file, keep only its tensors: torch.save(ckpt['model'], 'finelap_weights.pt') "
                "in an environment that can load it, and import that"
            ) from None
        raw, layout = _tensor_state(obj, path, key="model"), "pickle"
    # the same names under a wrapper prefix (DDP, or a Hugging Face wrapper module)
    for pre in _FL_PREFIXES:
        if any(k.startswith(pre + _FL_EAT) for k in raw):
            state = {k[len(pre):]: v for k, v in raw.items() if k.startswith(pre)}
            if len(state) != len(raw):
                other = sorted(k for k in raw if not k.startswith(pre))
                raise SourceError(f"{path}: keys outside the FineLAP model ({', '.join(other[:3])})")
            return state, layout
    sample = ", ".join(sorted(raw)[:4])
    raise SourceError(
        f"{path}: not a FineLAP checkpoint with an EAT audio tower (no '{_FL_EAT}...' keys; first keys: {sample}). "
        "finelap reads the layout of xiquan-li/FineLAP's FineLAP module (finelap_fixed.pt)"
    )


def finelap_to_finelap(state: Mapping[str, torch.Tensor], path: Path | str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """FineLAP (EAT + RoBERTa + decoupled projector) parameter names -> FineLAPModel names, and the
    architecture read off the shapes. Rules from xiquan-li/FineLAP `models/finelap.py`,
    `models/audio_encoder.py` and the vendored EAT (`images.py`, `base.py`, `modules.py`):

    - EAT: `modality_encoders.IMAGE.local_encoder.proj` (16x16 conv) -> patch_embed;
      `fixed_positional_encoder.positions` (1, rows * 8, D) -> pos_embed (the first 64 rows, all
      a 1024-frame input uses); `extra_tokens` -> cls_token; `context_encoder.norm` -> input_norm;
      prenet blocks (`context_encoder.blocks`, none in EAT-base) then `blocks` -> blocks.
    - text_encoder.text_encoder (RoBERTa without pooler) -> text.model (a zero pooler is added: the
      tower pools the `<s>` state, the pooler is never used).
    - global_audio_proj / global_text_proj (Linear, ReLU, Linear) -> clip_head / text_head MLPs;
      local_audio_proj (Linear, TransformerEncoder) -> frame_head (post-norm layout).
    - temp_global / b_global / temp_local / b_local: logits = cos / temp + b -> log_scale = -log temp.
    """
    out: dict[str, torch.Tensor] = {}
    arch: dict[str, Any] = {}
    prenet: dict[str, torch.Tensor] = {}
    main: dict[str, torch.Tensor] = {}
    scalars: dict[str, torch.Tensor] = {}
    img = _FL_EAT + "modality_encoders.IMAGE."
    for k, v in state.items():
        if _FL_DROP.match(k) or k.endswith(_DERIVED_BUFFERS):
            continue
        if k.startswith(img):
            name = k[len(img):]
            if name.startswith("local_encoder.proj."):
                out["audio.backend.vit.patch_embed." + name[len("local_encoder.proj."):]] = v
            elif name == "fixed_positional_encoder.positions":
                out["audio.backend.vit.pos_embed"] = v
            elif name == "extra_tokens":
                if v.dim() != 3 or v.shape[1] != 1:
                    raise SourceError(f"{path}: {k} has shape {tuple(v.shape)}; finelap supports EAT with one extra (CLS) token")
                out["audio.backend.vit.cls_token"] = v
            elif name.startswith("context_encoder.norm."):
                out["audio.backend.vit.input_norm." + name[len("context_encoder.norm."):]] = v
            elif name.startswith("context_encoder.blocks."):
                prenet[name[len("context_encoder.blocks."):]] = v
            elif name.startswith(("alibi_scale", "alibi_bias")):
                raise SourceError(f"{path}: {k}: EAT with ALiBi attention biases is not supported (FineLAP's EAT has none)")
            else:
                raise SourceError(f"{path}: unexpected EAT parameter {k!r}")
        elif k.startswith(_FL_EAT + "blocks."):
            main[k[len(_FL_EAT + "blocks."):]] = v
        elif k.startswith(_FL_EAT + "norm."):
            raise SourceError(f"{path}: {k}: a pre-norm EAT (layer_norm_first) is not supported; FineLAP's EAT is post-norm")
        elif k.startswith("text_encoder.text_encoder."):
            out["text.model." + k[len("text_encoder.text_encoder."):]] = v
        elif re.match(r"^global_(audio|text)_proj\.[02]\.(weight|bias)$", k):
            which, idx, p = k.split(".")
            out[f"{'clip_head' if which == 'global_audio_proj' else 'text_head'}.mlp.{0 if idx == '0' else 3}.{p}"] = v
        elif re.match(r"^local_audio_proj\.0\.(weight|bias)$", k):
            out["frame_head.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("local_audio_proj.1.layers."):
            out["frame_head.encoder.layers." + k[len("local_audio_proj.1.layers."):]] = v
        elif k in ("temp_global", "b_global", "temp_local", "b_local"):
            scalars[k] = v.reshape(())
        elif k.startswith("local_audio_proj."):
            raise SourceError(
                f"{path}: {k}: this FineLAP local projector is not the released 'transformer' type "
                "(Linear + TransformerEncoder); finelap imports only that one"
            )
        else:
            raise SourceError(f"{path}: unexpected FineLAP parameter {k!r}")
    # EAT blocks: prenet blocks run first, then the main ones (both post-norm AltBlocks)
    n_pre = len({n.split(".")[0] for n in prenet})
    for offset, group in ((0, prenet), (n_pre, main)):
        for name, v in group.items():
            i, rest = name.split(".", 1)
            part, p = rest.rsplit(".", 1)
            if part not in _FL_BLOCK_PARTS:
                raise SourceError(f"{path}: unexpected EAT block parameter {name!r}")
            out[f"audio.backend.vit.blocks.{int(i) + offset}.{_FL_BLOCK_PARTS[part]}.{p}"] = v
    need = ("audio.backend.vit.patch_embed.weight", "audio.backend.vit.pos_embed", "audio.backend.vit.cls_token",
            "clip_head.mlp.0.weight", "text_head.mlp.0.weight", "frame_head.proj.weight", "audio.backend.vit.blocks.0.fc1.weight")  # fmt: skip
    missing = [n for n in need if n not in out]
    if missing:
        raise SourceError(f"{path}: incomplete FineLAP checkpoint (nothing maps to {', '.join(missing[:3])})")
    pe = out["audio.backend.vit.patch_embed.weight"]
    dim, patch = int(pe.shape[0]), int(pe.shape[-1])
    if pe.shape[1] != 1 or pe.shape[-2] != patch:
        raise SourceError(f"{path}: EAT patch embedding of shape {tuple(pe.shape)}; expected (D, 1, p, p)")
    cols = 128 // patch
    rows = 1024 // patch
    pos = out["audio.backend.vit.pos_embed"].reshape(-1, dim)
    if pos.shape[0] < rows * cols or pos.shape[0] % cols:
        raise SourceError(f"{path}: EAT position table of {pos.shape[0]} entries cannot cover a {rows} x {cols} patch grid")
    out["audio.backend.vit.pos_embed"] = pos[: rows * cols].clone()
    depth = n_pre + len({n.split(".")[0] for n in main})
    fc1 = out["audio.backend.vit.blocks.0.fc1.weight"]
    layers = sorted({int(k.split(".")[3]) for k in out if k.startswith("frame_head.encoder.layers.")})
    if not layers:
        raise SourceError(f"{path}: local_audio_proj has no TransformerEncoder layers")
    ff = out["frame_head.encoder.layers.0.linear1.weight"]
    embed = int(out["clip_head.mlp.3.weight"].shape[0])
    arch.update(
        audio={"dim": dim, "depth": depth, "heads": heads_for_width(dim), "mlp_ratio": fc1.shape[0] / dim, "patch_size": patch},
        embed_dim=embed,
        clip_head_hidden=int(out["clip_head.mlp.0.weight"].shape[0]),
        text_head_hidden=int(out["text_head.mlp.0.weight"].shape[0]),
        text_width=int(out["text_head.mlp.0.weight"].shape[1]),
        frame_head_layers=len(layers),
        frame_head_mlp_ratio=ff.shape[0] / ff.shape[1],
    )
    # logits = cos / temp + b; a scalar the config set to 0 was never created: no scaling / no bias
    for stream in ("global", "local"):
        temp = scalars.get(f"temp_{stream}")
        bias = scalars.get(f"b_{stream}")
        if temp is not None and not float(temp) > 0:
            raise SourceError(f"{path}: temp_{stream} = {float(temp)} is not a positive temperature")
        tgt = "clip_scale_bias" if stream == "global" else "frame_scale_bias"
        out[f"{tgt}.log_scale"] = -torch.log(temp.double()).float() if temp is not None else torch.zeros(())
        out[f"{tgt}.bias"] = bias.float() if bias is not None else torch.zeros(())
    return out, arch


def convert_finelap(src: Path, text_model: Path | None) -> Converted:
    """FineLAP `finelap_fixed.pt` (AndreasXi/FineLAP_Pytorch: {'model': state_dict}) or a
    safetensors file in the same naming; `text_model` = a local roberta-base folder (config and
    tokenizer; the weights are in the checkpoint)."""
    if text_model is None:
        raise SourceError("finelap checkpoints need --text-model DIR (a local roberta-base folder: config and tokenizer)")
    raw, layout = _finelap_state(src)
    state, arch = finelap_to_finelap(raw, src)
    text_cfg = _text_config_from_dir(text_model)
    if int(text_cfg.hidden_size) != arch["text_width"]:
        raise SourceError(f"{text_model}: text width {text_cfg.hidden_size} does not match the checkpoint's projector input ({arch['text_width']})")
    if "text.model.pooler.dense.weight" not in state:  # FineLAP builds RoBERTa without its pooler
        h = int(text_cfg.hidden_size)
        state["text.model.pooler.dense.weight"] = torch.zeros(h, h)
        state["text.model.pooler.dense.bias"] = torch.zeros(h)
    scale = {n: float(state[f"{n}_scale_bias.log_scale"].exp()) for n in ("clip", "frame")}
    embed = arch["embed_dim"]
    if embed % 8:
        raise SourceError(f"{src}: projector width {embed} is not divisible by the local projector's 8 heads")
    model = {
        "audio_encoder": "eat",
        "audio": dict(arch["audio"]),
        "text": {"path": "text", "pooling": "cls", "max_length": 30, "weights": "checkpoint"},
        "embed_dim": embed,
        "clip_pooling": "cls",
        "clip_head_hidden": arch["clip_head_hidden"],
        "text_head_hidden": arch["text_head_hidden"],
        "head_activation": "relu",
        "frame_head": True,
        "frame_head_style": "post_norm",
        "frame_head_layers": arch["frame_head_layers"],
        "frame_head_heads": 8,
        "frame_head_mlp_ratio": arch["frame_head_mlp_ratio"],
        "frame_head_per_window": True,
        "clip_scale_init": scale["clip"],
        "clip_bias_init": float(state["clip_scale_bias.bias"]),
        "frame_scale_init": scale["frame"],
        "frame_bias_init": float(state["frame_scale_bias.bias"]),
        "max_logit_scale": max(1e4, 2 * max(scale.values())),  # cos / temp exactly: never clamp the released scale
    }
    run_config = {
        "preset": "finelap",
        "name": "finelap-import",
        "model": model,
        # the fbank's framing (the encoder computes the Kaldi fbank itself; this section documents it)
        "audio": {"sample_rate": 16000, "n_fft": 512, "win_length": 400, "hop_length": 160, "n_mels": 128,
                  "fmin": 20.0, "fmax": 8000.0, "clip_seconds": 10.24, "max_seconds": 30.0},  # fmt: skip
        "loss": {"clip": "sigmoid", "frame": "finelap"},
        # FineLAP's evaluate.py: zero-shot prompt "The sound of {}", SED scores median-filtered over 3 frames
        "eval": {"prompt_template": "The sound of {}", "median_filter_s": 3 * 0.16},
    }
    notes = [f"read the {layout} layout", f"EAT heads assumed {arch['audio']['heads']} (64 channels per head; not stored in the weights)"]
    return Converted(run_config, state, text_cfg, text_model, notes)


_CLAP_AUDIO_FIELDS = (
    "window_size", "num_mel_bins", "spec_size", "hidden_act", "patch_size", "patch_stride", "num_classes", "hidden_size",
    "projection_dim", "depths", "num_attention_heads", "enable_fusion", "fusion_type", "patch_embed_input_channels",
    "flatten_patch_embeds", "patch_embeds_hidden_size", "enable_patch_layer_norm", "qkv_bias", "mlp_ratio",
    "aff_block_r", "num_hidden_layers", "projection_hidden_act", "layer_norm_eps",
)

# ============================================================================ writing a checkpoint

IMPORTERS: dict[str, Callable[[Path, Path | None], Converted]] = {
    "laion-clap": convert_laion_clap,
    "flam": convert_flam,
    "finelap": convert_finelap,
}


def _save_text_dir(conv: Converted, dest: Path) -> None:
    """The text tower's config.json and tokenizer files (no weights: those are in model.safetensors)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(conv.tokenizer_dir), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise SourceError(f"{conv.tokenizer_dir}: cannot load a tokenizer ({type(e).__name__}: {e})") from None
    dest.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(dest))
    conv.text_config.save_pretrained(str(dest))
    for f in dest.iterdir():  # the tower's weights live in model.safetensors only
        if f.suffix in (".safetensors", ".bin"):
            f.unlink()


def _load_converted(model: nn.Module, state: Mapping[str, torch.Tensor], src: Path) -> None:
    """Strict load, except the deterministic buffers the modules create themselves."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(_DERIVED_BUFFERS)]
    unexpected = [k for k in state if k not in own]
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise SourceError(
            f"{src}: converted weights do not fit the architecture read from it "
            f"(missing: {missing[:4]}, unexpected: {unexpected[:4]}, shape mismatch: {bad[:3]})"
        )
    model.load_state_dict({**own, **state}, strict=True)


def import_checkpoint(kind: str, src: str | os.PathLike, text_model: str | os.PathLike | None, out: str | os.PathLike,
                      overwrite: bool = False) -> Path:  # fmt: skip
    """Convert a downloaded release into a finelap checkpoint directory at `out` (written atomically:
    a half-finished import never looks like a checkpoint). Returns `out`."""
    from ..config import resolve_run_config
    from ..checkpoint import CONFIG_FILE, save_checkpoint
    from .build import model_config_for
    from .model import FineLAPModel

    if kind not in IMPORTERS:
        raise SourceError(f"unknown source kind {kind!r}; choose one of {', '.join(IMPORTERS)}")
    src_p = Path(src)
    if not src_p.exists():
        raise SourceError(f"{src_p}: not found")
    tm = Path(text_model) if text_model is not None else None
    if tm is not None and not tm.is_dir():
        raise SourceError(f"{tm}: text model directory not found")
    out_p = Path(out)
    if out_p.exists() and not overwrite:
        raise SourceError(f"{out_p}: already exists (pass --overwrite to replace it)")
    if out_p.exists() and not (out_p / CONFIG_FILE).is_file():
        raise SourceError(f"{out_p}: exists and is not a finelap checkpoint; refusing to replace it")
    conv = IMPORTERS[kind](src_p, tm)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_p.name}.import-", dir=out_p.parent))
    try:
        text_dir = stage / "text"
        _save_text_dir(conv, text_dir)
        rc = dict(conv.run_config)
        rc["model"] = {**rc["model"], "text": {**rc["model"]["text"], "path": str(text_dir)}}
        run_cfg = resolve_run_config(rc)
        model = FineLAPModel(model_config_for(run_cfg))
        _load_converted(model, conv.state, src_p)
        model.eval()
        run_cfg.model.text.path = "text"  # relative: resolved against the checkpoint directory on load
        ckpt = stage / "ckpt"
        save_checkpoint(
            ckpt, model.state_dict(), run_cfg, step=0, rng=False, update_latest=False,
            preprocessing={"frame_rate_hz": model.frame_rate_hz, "imported_from": kind, "source": src_p.name,
                           "import_notes": conv.notes},
        )  # fmt: skip
        shutil.move(str(text_dir), str(ckpt / "text"))
        if out_p.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_p.name}.old-", dir=out_p.parent))
            os.rmdir(old)
            os.rename(out_p, old)
            os.rename(ckpt, out_p)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(ckpt, out_p)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_p


# MGA-CLAP's importer lives in its own module and registers itself in IMPORTERS on import
from . import published_mga as _published_mga  # noqa: E402,F401
