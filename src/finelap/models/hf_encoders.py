"""Hugging Face audio towers behind the encoder contract (`encoder_base`), loaded from a local
directory (nothing downloads): wav2vec2 / HuBERT / WavLM / data2vec-audio, the Whisper encoder,
AST and CLAP's HTS-AT (`HFAudioEncoder`, "hf"). `PublishedWindowEncoder` is the base of finelap's
own builds of published fixed-window towers (`published.HTSATEncoder`, `eat.EATEncoder`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..audio import LogMel, MelConfig, Timeline
from ..errors import ConfigError
from .encoder_base import AudioEncoder, AudioFeatures, lengths_to_mask
from .encoder_registry import AudioEncoderOptions, register_audio_encoder

__all__ = ["HFAudioEncoder", "HFOptions", "PublishedWindowEncoder", "WAVE_FAMILY"]


WAVE_FAMILY = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat", "wav2vec2-conformer", "sew", "sew-d")


def _load_feature_extractor(path: Path):
    if not (path / "preprocessor_config.json").exists():
        return None
    from transformers import AutoFeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot load preprocessor_config.json ({type(e).__name__}: {e})") from None


class _WaveBackend(nn.Module):
    """wav2vec2-family: raw waveform -> conv feature extractor (stride S, receptive field R) -> transformer.

    The wave is padded (R - S) / 2 samples on the left, so frame j is centred on its Timeline span
    [jS, (j+1)S), and enough on the right that the model emits at least 1 + n // S frames.
    """

    variable_length = True

    def __init__(self, model: nn.Module, config: Any, fe: Any, layer: int | None) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        kernels, strides = list(config.conv_kernel), list(config.conv_stride)
        self.kernels, self.strides = kernels, strides
        stride = math.prod(strides)
        rf, jump = 1, 1
        for k, s in zip(kernels, strides):
            rf += (k - 1) * jump
            jump *= s
        self.rf = rf
        self.left = max(0, (rf - stride) // 2)
        self.right = rf
        sr = int(getattr(fe, "sampling_rate", 16000)) if fe is not None else 16000
        self.do_normalize = bool(getattr(fe, "do_normalize", True)) if fe is not None else True
        if fe is not None:
            self.use_mask = bool(getattr(fe, "return_attention_mask", False))
        else:  # HF convention: group-norm feature encoders were trained without attention masks
            self.use_mask = getattr(config, "feat_extract_norm", "group") == "layer"
        self.timeline = Timeline(frame_rate_hz=sr / stride, sample_rate=sr, hop_length=stride, downsample=1)
        self.dim = int(config.hidden_size)

    def native_frames(self, n: int) -> int:
        for k, s in zip(self.kernels, self.strides):
            n = (n - k) // s + 1
        return n

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.do_normalize:  # Wav2Vec2FeatureExtractor: zero mean, unit variance over each item's valid samples
            m = lengths_to_mask(lengths, wave.shape[1]).to(wave.dtype)
            cnt = lengths.clamp(min=1).to(wave.dtype)[:, None]
            mean = (wave * m).sum(1, keepdim=True) / cnt
            var = ((wave - mean).square() * m).sum(1, keepdim=True) / cnt
            wave = (wave - mean) / torch.sqrt(var + 1e-7) * m
        x = F.pad(wave, (self.left, self.right))
        kwargs: dict[str, Any] = {}
        if self.use_mask:
            kwargs["attention_mask"] = lengths_to_mask(lengths + self.left + self.right, x.shape[1]).long()
        if self.layer is not None:
            kwargs["output_hidden_states"] = True
        out = self.model(x, **kwargs)
        h = out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]
        return h, None


class _WindowBackend(nn.Module):
    """Fixed-input models (Whisper, AST, CLAP): each window of `window_samples` yields `frames_per_window`
    frames; windows start every frames_per_window * samples_per_frame samples (a fixed grid)."""

    variable_length = False
    uses_lengths = False  # features(chunks, valid_samples): the backend needs each window's audio length
    returns_context = False  # _encode also returns the unmasked window frames (AudioFeatures.context_frames)
    frames_per_window: int
    step_samples: int
    window_samples: int

    def features(self, chunks: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def run(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


def _extractor_features(fe: Any, chunks: torch.Tensor, sr: int, key: str, **kw) -> torch.Tensor:
    arrays = [c.detach().cpu().double().numpy() for c in chunks]
    out = fe(arrays, sampling_rate=sr, return_tensors="pt", **kw)
    return out[key].to(device=chunks.device, dtype=torch.float32)


class _WhisperBackend(_WindowBackend):
    def __init__(self, model: nn.Module, config: Any, fe: Any) -> None:
        super().__init__()
        self.encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
        self.fe = fe
        n_pos = int(config.max_source_positions)
        sr, hop = 16000, 160
        if fe is not None:
            sr, hop = int(fe.sampling_rate), int(fe.hop_length)
            if int(fe.nb_max_frames) != 2 * n_pos:
                raise ConfigError(
                    f"Whisper feature extractor makes {fe.nb_max_frames} mel frames per window but the encoder "
                    f"expects {2 * n_pos} (max_source_positions={n_pos})"
                )
        self.sr = sr
        self.frames_per_window = n_pos
        self.window_samples = self.step_samples = 2 * n_pos * hop
        self.timeline = Timeline(frame_rate_hz=sr / (2 * hop), sample_rate=sr, hop_length=hop, downsample=2)
        self.dim = int(config.d_model)
        self.n_mel_frames = 2 * n_pos
        if fe is None:
            self.logmel = LogMel(
                MelConfig(sample_rate=sr, n_fft=400, win_length=400, hop_length=hop, n_mels=int(config.num_mel_bins),
                          fmin=0.0, fmax=sr / 2, compute_dtype="float32")
            )

    def features(self, chunks: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fe is not None:
            return {"input_features": _extractor_features(self.fe, chunks, self.sr, "input_features")}
        # WhisperFeatureExtractor's recipe: log10 mel, drop the last frame, floor at max - 8, (x + 4) / 4
        x = (self.logmel(chunks) / 10.0)[..., : self.n_mel_frames]
        x = torch.maximum(x, x.amax(dim=(-2, -1), keepdim=True) - 8.0)
        return {"input_features": (x + 4.0) / 4.0}

    def run(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.encoder(feats["input_features"]).last_hidden_state, None


class _ASTBackend(_WindowBackend):
    """AST: patches on a (max_length x n_mels) fbank; frames = patch columns averaged over frequency."""

    def __init__(self, model: nn.Module, config: Any, fe: Any) -> None:
        super().__init__()
        self.model = model
        self.fe = fe
        p = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        self.f_dim = (config.num_mel_bins - p) // config.frequency_stride + 1
        self.t_dim = (config.max_length - p) // config.time_stride + 1
        sr, hop, win = 16000, 160, 400  # kaldi fbank framing used by ASTFeatureExtractor
        if fe is not None:
            sr = int(fe.sampling_rate)
            if int(fe.max_length) != int(config.max_length) or int(fe.num_mel_bins) != int(config.num_mel_bins):
                raise ConfigError(
                    f"AST feature extractor (max_length={fe.max_length}, num_mel_bins={fe.num_mel_bins}) does not "
                    f"match the model (max_length={config.max_length}, num_mel_bins={config.num_mel_bins})"
                )
        self.sr = sr
        self.max_length = int(config.max_length)
        self.frames_per_window = self.t_dim
        self.step_samples = self.t_dim * config.time_stride * hop
        self.window_samples = (self.max_length - 1) * hop + win
        self.timeline = Timeline(frame_rate_hz=sr / (hop * config.time_stride), sample_rate=sr, hop_length=hop,
                                 downsample=int(config.time_stride))
        self.dim = int(config.hidden_size)
        if fe is None:
            self.logmel = LogMel(
                MelConfig(sample_rate=sr, n_fft=512, win_length=win, hop_length=hop, n_mels=int(config.num_mel_bins),
                          fmin=20.0, fmax=sr / 2, compute_dtype="float32")
            )

    def features(self, chunks: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fe is not None:
            return {"input_values": _extractor_features(self.fe, chunks, self.sr, "input_values")}
        # natural-log mel energies like kaldi fbank, then ASTFeatureExtractor's AudioSet normalisation
        x = self.logmel(chunks)[..., : self.max_length] * (math.log(10.0) / 10.0)
        x = (x.transpose(1, 2) - (-4.2677393)) / (4.5689974 * 2)
        return {"input_values": x}

    def run(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.model(feats["input_values"]).last_hidden_state  # (K, 2 + f*t, H)
        cls = 0.5 * (h[:, 0] + h[:, 1])  # ASTModel's pooler: mean of CLS and distillation tokens
        k = h.shape[0]
        frames = h[:, 2:].reshape(k, self.f_dim, self.t_dim, -1).mean(1)
        return frames, cls


class _ClapBackend(_WindowBackend):
    """CLAP's HTS-AT audio tower: 10 s (max_length_s) windows at 48 kHz; frames from the token-semantic
    grid before pooling (last_hidden_state (K, C, F', T') averaged over F')."""

    def __init__(self, model: nn.Module, config: Any, fe: Any) -> None:
        super().__init__()
        self.model = model
        self.fe = fe
        self.fusion = bool(getattr(config, "enable_fusion", False))
        stride_t = config.patch_stride if isinstance(config.patch_stride, int) else config.patch_stride[1]
        freq_ratio = config.spec_size // config.num_mel_bins
        self.frames_per_window = (config.spec_size // stride_t // 2 ** (len(config.depths) - 1)) * freq_ratio
        if fe is not None:
            sr, hop, n_fft = int(fe.sampling_rate), int(fe.hop_length), int(fe.fft_window_size)
            window = int(fe.max_length_s) * sr
        else:  # LAION-CLAP's recipe: 10 s at 48 kHz, or less if the model's input is shorter
            sr, hop, n_fft = 48000, 480, 1024
            max_mel = config.spec_size * freq_ratio  # HTS-AT refuses more mel frames than this
            window = min(10 * sr, (max_mel - 1) * hop)
            window -= window % self.frames_per_window
        self.sr = sr
        self.window_samples = self.step_samples = window
        if self.window_samples % self.frames_per_window:
            raise ConfigError(
                f"CLAP window of {self.window_samples} samples does not split into {self.frames_per_window} frames"
            )
        spf = self.window_samples // self.frames_per_window
        self.timeline = Timeline(frame_rate_hz=sr / spf, sample_rate=sr, hop_length=spf, downsample=1)
        self.dim = int(config.patch_embeds_hidden_size * 2 ** (len(config.depths) - 1))  # width of the last stage
        if fe is None:
            self.logmel = LogMel(
                MelConfig(sample_rate=sr, n_fft=n_fft, win_length=n_fft, hop_length=hop, n_mels=int(config.num_mel_bins),
                          fmin=50.0, fmax=14000.0, compute_dtype="float32")
            )

    def features(self, chunks: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fe is not None:
            # chunks are exactly max_length_s long, so neither truncation mode draws a random crop
            trunc = "fusion" if self.fusion else "rand_trunc"
            out = self.fe([c.detach().cpu().double().numpy() for c in chunks], sampling_rate=self.sr,
                          return_tensors="pt", truncation=trunc, padding="repeatpad")
            feats = {"input_features": out["input_features"].to(chunks.device, torch.float32)}
            if self.fusion:
                # no window is longer than max_length_s; the extractor marks a random one "longer"
                # anyway (a training trick) which would make inference random, so we don't use its flag
                feats["is_longer"] = torch.zeros(chunks.shape[0], 1, dtype=torch.bool, device=chunks.device)
            return feats
        x = self.logmel(chunks).transpose(1, 2)[:, None]  # (K, 1, T, F) dB
        if self.fusion:
            return {"input_features": x.repeat(1, 4, 1, 1),
                    "is_longer": torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device)}
        return {"input_features": x}

    def run(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model(**feats)
        frames = out.last_hidden_state.mean(2).transpose(1, 2)  # (K, T', C)
        return frames, out.pooler_output


@dataclass(kw_only=True)
class HFOptions(AudioEncoderOptions):
    """`model.audio` of "hf" (see `HFAudioEncoder`): `path`, a local Hugging Face model directory, is required."""

    path: str | Path
    layer: int | None = None
    window_batch: int = 16
    use_feature_extractor: bool = True


@register_audio_encoder("hf", options=HFOptions)
class HFAudioEncoder(AudioEncoder):
    """Adapter for Hugging Face audio encoders stored in a local directory.

    Supported `model_type`s: wav2vec2, hubert, wavlm, data2vec-audio (and other wav2vec2-style conv
    front-ends), whisper (encoder only), audio-spectrogram-transformer (AST), clap / clap_audio_model
    (HTS-AT). The frame rate comes from the model config (conv strides / sample rate, Whisper's 2 x
    mel hop, AST's time stride, HTS-AT's token grid). Preprocessing follows the model's
    feature extractor when the directory has one (preprocessor_config.json), otherwise our torch
    log-mel with that extractor's recipe. Fixed-length models (Whisper, AST, CLAP) are run on a
    deterministic grid of windows covering the whole input.

    layer: which hidden state to return for wav2vec2-family models (None = last_hidden_state).
    window_batch: windows encoded per call for fixed-length models (bounds memory).
    """

    def __init__(
        self,
        path: str | Path,
        layer: int | None = None,
        freeze: bool = False,
        lr_mult: float = 1.0,
        window_batch: int = 16,
        use_feature_extractor: bool = True,
    ) -> None:
        super().__init__(freeze=False, lr_mult=lr_mult)
        path = Path(path)
        if not (path / "config.json").exists():
            raise ConfigError(f"{path}: not a Hugging Face model directory (no config.json)")
        from .text_encoders import refuse_custom_code

        refuse_custom_code(path)  # before any transformers call: nothing is asked, nothing imported from `path`
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read config.json ({type(e).__name__}: {e})") from None
        mt = config.model_type
        self.model_type = mt
        self.path = path
        fe = _load_feature_extractor(path) if use_feature_extractor else None
        self.window_batch = window_batch
        try:
            if mt in WAVE_FAMILY:
                self.backend: nn.Module = _WaveBackend(AutoModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False), config, fe, layer)
            elif mt == "whisper":
                self.backend = _WhisperBackend(AutoModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False), config, fe)
            elif mt == "audio-spectrogram-transformer":
                self.backend = _ASTBackend(AutoModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False), config, fe)
            elif mt in ("clap", "clap_audio_model"):
                if mt == "clap":  # full CLAP checkpoint: keep only the audio tower (our heads replace its projection)
                    from transformers import ClapModel

                    audio = ClapModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False).audio_model
                    acfg = config.audio_config
                else:
                    from transformers import ClapAudioModel

                    audio = ClapAudioModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
                    acfg = config
                self.backend = _ClapBackend(audio, acfg, fe)
            else:
                raise ConfigError(
                    f"{path}: unsupported audio model_type {mt!r}; supported: {', '.join(WAVE_FAMILY)}, whisper, "
                    "audio-spectrogram-transformer, clap"
                )
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot load the audio model ({type(e).__name__}: {e})") from None
        if layer is not None and mt not in WAVE_FAMILY:
            raise ConfigError(f"layer= is only supported for wav2vec2-family models, not {mt!r}")
        self.timeline = self.backend.timeline
        self.dim = self.backend.dim
        if freeze:
            self.freeze()

    def _encode(self, wave: torch.Tensor, lengths: torch.Tensor, mask_frames: torch.Tensor | None) -> AudioFeatures:
        if mask_frames is not None:
            raise ConfigError("masked-frame input (mask_frames) is not supported by HF audio adapters")
        tl = self.timeline
        t = self.num_frames(wave.shape[1])
        valid = self.frame_lengths(lengths)
        fm = lengths_to_mask(valid, t)
        be = self.backend
        context = context_mask = None
        if be.variable_length:
            h, cls = be(wave, lengths)
            if h.shape[1] < t:
                raise RuntimeError(f"{self.model_type} gave {h.shape[1]} frames, need {t}")
            frames = h[:, :t]
        else:
            fpw, step, win = be.frames_per_window, be.step_samples, be.window_samples
            n_win = -(-t // fpw)
            x = F.pad(wave, (0, max(0, (n_win - 1) * step + win - wave.shape[1])))
            chunks = x.unfold(1, win, step)[:, :n_win]  # (B, K, win)
            need = torch.arange(n_win, device=wave.device)[None, :] * fpw < valid[:, None]  # skip all-padding windows
            idx = need.flatten().nonzero().squeeze(1)
            flat = chunks.reshape(-1, win)
            # samples of audio in each window (0 for windows past the end)
            win_valid = (lengths[:, None] - torch.arange(n_win, device=wave.device)[None, :] * step).clamp(0, win).reshape(-1)
            out = torch.zeros(flat.shape[0], fpw, self.dim, device=wave.device, dtype=wave.dtype)
            cls_all = None
            for i in range(0, idx.numel(), self.window_batch):
                sel = idx[i : i + self.window_batch]
                feats_i = be.features(flat[sel], win_valid[sel]) if be.uses_lengths else be.features(flat[sel])
                f_i, c_i = be.run(feats_i)
                out = out.index_copy(0, sel, f_i.to(out.dtype))
                if c_i is not None:
                    if cls_all is None:
                        cls_all = torch.zeros(flat.shape[0], c_i.shape[-1], device=wave.device, dtype=wave.dtype)
                    cls_all = cls_all.index_copy(0, sel, c_i.to(wave.dtype))
            frames = out.view(wave.shape[0], n_win * fpw, self.dim)[:, :t]
            if be.returns_context:  # whole windows: the last one may extend past T
                context = out.view(wave.shape[0], n_win * fpw, self.dim)
                context_mask = need.repeat_interleave(fpw, dim=1)
            cls = None
            if cls_all is not None:  # clip token: mean over the item's windows
                w = need.to(wave.dtype)
                cls = (cls_all.view(wave.shape[0], n_win, -1) * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
        frames = frames * fm[..., None].to(frames.dtype)
        if context is not None:
            return AudioFeatures(frames=frames, frame_mask=fm, frame_rate_hz=tl.frame_rate_hz, cls=cls,
                                 context_frames=context, context_mask=context_mask)  # fmt: skip
        return AudioFeatures(frames=frames, frame_mask=fm, frame_rate_hz=tl.frame_rate_hz, cls=cls)


class PublishedWindowEncoder(HFAudioEncoder):
    """Base of finelap's own builds of published fixed-window towers (HTS-AT, EAT): the HF adapter's
    window machinery around a backend made from a config rather than a Hugging Face folder.

    A frame is valid when it starts before the end of the audio: ceil(n / samples_per_frame) frames.
    """

    def _adopt(self, backend: _WindowBackend, model_type: str, window_batch: int, freeze: bool) -> None:
        """Finish construction (after `AudioEncoder.__init__` and building `backend`)."""
        self.backend = backend
        self.model_type = model_type
        self.path = None
        self.window_batch = int(window_batch)
        self.timeline = backend.timeline
        self.dim = backend.dim
        if freeze:
            self.freeze()

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        spf = self.timeline.hop_length * self.timeline.downsample  # type: ignore[operator]
        return torch.div(lengths + spf - 1, spf, rounding_mode="floor")
