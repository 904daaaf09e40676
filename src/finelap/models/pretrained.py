"""Pretrained audio towers that work offline.

`aisfx`: the sound-effects embedding CNN of Ma & Lerch, "Representation Learning for the Automatic
Indexing of Sound Effects Libraries" (ISMIR 2022). Its weights ship inside the PyPI wheel
`aisfx==0.1.2` (file `aisfx/models/checkpoint.pth`, CC-BY-4.0, (c) 2022 A. B. Ma and A. Lerch,
https://github.com/alisonbma/aisfx). finelap never imports that package (it pins numpy 1.23 and
librosa 0.9); it reads only the weight file, safely, and converts it once to safetensors:

- the pickle is opened with `torch.load(weights_only=True)` and an allow-list of the four numpy /
  codecs globals the file needs, after its sha256 is checked against the released file's;
- the 96 tensors of the embedding network are renamed to finelap's module names and written to
  `<cache>/aisfx-0.1.2-<sha12>.safetensors` (`$FINELAP_CACHE`, else `$XDG_CACHE_HOME/finelap`,
  else `~/.cache/finelap`), atomically; later loads read only that file. The 9 classifier heads
  in the pickle are dropped (no class names ship with them).

The network (reimplemented here): 4 blocks of [3x3 conv (no bias) -> BatchNorm -> ReLU] x 2, with a
2x2 max-pool after blocks 1-3; 64/128/256/512 channels, on a (time, 96 mel) log-mel image.
Front-end (`AisfxFrontEnd`): mono 44.1 kHz, periodic Hann STFT n_fft = win = 2048, hop 1024,
centred with zero padding, power; 96 HTK mel bands 0-22,050 Hz, each triangle normalised to sum 1;
`log10(1e4 * x + 1) / 9.4578`. The package's librosa path also peak-normalises each file and its
training path did not; finelap does not (it would make features depend on the whole file, which
breaks streaming).

Frames. The original pools block 3 in time too, giving a map every 8 mel frames (186 ms). With
`hop_frames=4` (the default) block 3's time pool has stride 1 and block 4's convolutions are
dilated by 2 in time: the same weights then give a 93-ms map whose even frames equal the 186-ms
map (away from the end), i.e. twice the time resolution at the same receptive field (~1.6 s).
Each selected layer (`layers`, default block 4 and block 2) is averaged over frequency and the
layers are concatenated: block 4 carries the semantics, block 2 (receptive field ~0.3 s) sharper
onsets and offsets for detection. Padding is zeroed after every block, so a padded batch gives
each item exactly its own frames, and windows with >= 1.6 s of margin stitch exactly.
`cls` is the masked time-max of the frames (for block 4 alone: the aisfx clip embedding).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..audio import Timeline
from ..errors import CheckpointError, ConfigError
from .audio_encoders import AudioEncoder, AudioFeatures, lengths_to_mask
from .encoder_registry import AudioEncoderOptions, register_audio_encoder

__all__ = [
    "AISFX_SHA256",
    "AISFX_SOURCE",
    "AisfxFrontEnd",
    "AisfxEncoder",
    "aisfx_weight_file",
    "aisfx_state_dict",
    "cache_dir",
    "htk_mel_filterbank",
]

AISFX_VERSION = "0.1.2"
AISFX_SHA256 = "499ea75909c932a2f94c35fa722fa4fabc5bcb7e84917209cc5f7402627b7eb5"
AISFX_SOURCE = {
    "weights": f"aisfx=={AISFX_VERSION} (PyPI wheel), file aisfx/models/checkpoint.pth, converted to safetensors by finelap",
    "licence": "CC-BY-4.0 (https://creativecommons.org/licenses/by/4.0/), (c) 2022 A. B. Ma and A. Lerch",
    "source": "https://github.com/alisonbma/aisfx",
    "paper": "A. B. Ma and A. Lerch, Representation Learning for the Automatic Indexing of Sound Effects Libraries, ISMIR 2022",
}
_INSTALL_HINT = f"install it with: pip install --no-deps aisfx=={AISFX_VERSION} (finelap reads only its weight file)"

SAMPLE_RATE = 44100
N_FFT = 2048
HOP = 1024
N_MELS = 96
LOG_SCALE = 9.457798957824707  # the max log-mel value over the paper's training sets: spectra / it lie in ~[0, 1]
CHANNELS = (64, 128, 256, 512)
_BLOCK_STRIDE = (1, 2, 4, 4)  # mel frames per frame of each block's output (block 4: 8 with hop_frames=8)


def cache_dir() -> Path:
    """finelap's cache folder: $FINELAP_CACHE, else $XDG_CACHE_HOME/finelap, else ~/.cache/finelap."""
    env = os.environ.get("FINELAP_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "finelap"


# ----------------------------------------------------------------------------- weights


def aisfx_weight_file() -> Path:
    """Path of `aisfx/models/checkpoint.pth` in the installed wheel, found without importing the package."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("aisfx")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / "models" / "checkpoint.pth"
        if p.is_file():
            return p
    raise CheckpointError(f"the aisfx weight file is not installed; {_INSTALL_HINT}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_pickle_safely(path: Path) -> dict[str, torch.Tensor]:
    """The released pickle `(state_dict, {dataset: (np.int64 index, n_classes)})`, opened with
    weights_only=True; only the numpy scalar/dtype and codecs globals that file uses are allowed."""
    import codecs

    allowed: list[Any] = [np.dtype, codecs.encode]
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    allowed.append((core.multiarray.scalar, "numpy.core.multiarray.scalar"))
    if hasattr(np, "dtypes"):
        allowed.append(np.dtypes.Int64DType)
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as the aisfx checkpoint with weights_only=True ({e})") from None
    state = obj[0] if isinstance(obj, (tuple, list)) else obj
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the embedding network, named as `AisfxNet` names it (conv_block{i}.{conv,bn}{1,2}.*)."""
    out = {}
    for k, v in state.items():
        if k.startswith("embedding_net.") and not k.endswith("num_batches_tracked"):
            out[k[len("embedding_net."):]] = v.detach().clone().contiguous().float()
    if len(out) != 4 * 2 * 5:  # per block: 2 conv weights + 2 BN x (weight, bias, mean, var)
        raise CheckpointError(f"aisfx weights: expected 40 embedding tensors, found {len(out)}")
    return out


def aisfx_state_dict(weights: str | Path | None = None, cache: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The aisfx embedding network's weights (finelap names).

    weights: the released `checkpoint.pth` (default: the installed wheel's) or an already converted
    `.safetensors` file. cache: folder for the converted file (default `cache_dir()`); the pickle is
    read (and its sha256 checked) only when the converted file is missing.
    """
    from safetensors.torch import load_file, save_file

    if weights is not None and Path(weights).suffix == ".safetensors":
        p = Path(weights)
        if not p.is_file():
            raise CheckpointError(f"{p}: no such file")
        return load_file(str(p))
    src = Path(weights) if weights is not None else aisfx_weight_file()
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file")
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / f"aisfx-{AISFX_VERSION}-{AISFX_SHA256[:12]}.safetensors"
    if target.is_file():
        try:
            return load_file(str(target))
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            pass
    digest = _sha256(src)
    if digest != AISFX_SHA256:
        raise CheckpointError(
            f"{src}: sha256 {digest[:16]}... is not the aisfx {AISFX_VERSION} release's ({AISFX_SHA256[:16]}...); "
            f"refusing to unpickle it. {_INSTALL_HINT}"
        )
    state = _rename(_load_pickle_safely(src))
    try:
        from ..utils import atomic_path

        with atomic_path(target) as tmp:
            save_file(state, str(tmp), metadata={"source": AISFX_SOURCE["weights"], "licence": AISFX_SOURCE["licence"]})
    except OSError:  # a read-only home: fine, convert again next time
        pass
    return state


# ----------------------------------------------------------------------------- front-end


def _hz_to_mel_htk(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz_htk(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def htk_mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular HTK-mel filters, each normalised to sum 1 (librosa's
    `filters.mel(htk=True, norm=1)`); an empty filter stays zero."""
    fmax = sr / 2 if fmax is None else fmax
    fft_freqs = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    mel_f = _mel_to_hz_htk(np.linspace(_hz_to_mel_htk(np.array(fmin)), _hz_to_mel_htk(np.array(fmax)), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0.0, np.minimum(lower, upper))
    s = w.sum(axis=1, keepdims=True)
    return np.where(s > 0, w / np.where(s > 0, s, 1.0), 0.0)


class AisfxFrontEnd(nn.Module):
    """wave (B, N) at 44.1 kHz -> log-mel (B, T, 96) with T = 1 + N // 1024, and valid lengths (B,)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True, dtype=torch.float32), persistent=False)
        self.register_buffer("fb", torch.from_numpy(htk_mel_filterbank()).float().t().contiguous(), persistent=False)  # (F, 96)

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = torch.stft(wave.float(), N_FFT, HOP, N_FFT, self.window, center=True, pad_mode="constant", return_complex=True)
        power = spec.real.square() + spec.imag.square()  # (B, F, T)
        mel = torch.matmul(power.transpose(1, 2), self.fb)  # (B, T, 96)
        logmel = torch.log10(mel * 1e4 + 1.0) / LOG_SCALE
        t_len = 1 + torch.div(lengths, HOP, rounding_mode="floor")
        return logmel, t_len


# ----------------------------------------------------------------------------- network


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, dilation_t: int = 1) -> None:
        super().__init__()
        pad = (dilation_t, 1)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=pad, dilation=(dilation_t, 1), bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=pad, dilation=(dilation_t, 1), bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        # x (B, C, T, F); keep (B, 1, T, 1) zeroes padding so that each item sees zero padding
        # exactly as a single-item pass would (conv padding is zeros)
        x = F.relu(self.bn1(self.conv1(x)))
        if keep is not None:
            x = x * keep
        x = F.relu(self.bn2(self.conv2(x)))
        if keep is not None:
            x = x * keep
        return x


def _pool_lengths(n: torch.Tensor) -> torch.Tensor:
    return torch.div(n + 1, 2, rounding_mode="floor")  # ceil: a partial last pair is kept


class AisfxNet(nn.Module):
    """The aisfx embedding CNN on (B, T, 96) log-mel; returns each block's output (B, C, T', F')."""

    def __init__(self, hop_frames: int = 4) -> None:
        super().__init__()
        if hop_frames not in (4, 8):
            raise ConfigError(f"aisfx hop_frames must be 4 (93 ms, dilated block 4) or 8 (186 ms, the original), got {hop_frames}")
        self.hop_frames = hop_frames
        dil = 2 if hop_frames == 4 else 1
        chans = (1,) + CHANNELS
        self.conv_block1 = _Block(chans[0], chans[1])
        self.conv_block2 = _Block(chans[1], chans[2])
        self.conv_block3 = _Block(chans[2], chans[3])
        self.conv_block4 = _Block(chans[3], chans[4], dilation_t=dil)

    def blocks(self) -> list[_Block]:
        return [self.conv_block1, self.conv_block2, self.conv_block3, self.conv_block4]

    def forward(self, mel: torch.Tensor, t_len: torch.Tensor, padded: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = mel[:, None]  # (B, 1, T, 96)
        n = t_len
        if padded:  # mel frames past each item's end see that item's last samples: zero them as a single pass would
            x = x * lengths_to_mask(n, x.shape[2])[:, None, :, None].to(x.dtype)
        outs = []
        for i, blk in enumerate(self.blocks()):
            keep = lengths_to_mask(n, x.shape[2])[:, None, :, None].to(x.dtype) if padded else None
            x = blk(x, keep)
            outs.append(x)
            if i < 2 or (i == 2 and self.hop_frames == 8):
                x = F.max_pool2d(x, 2, ceil_mode=True)  # post-ReLU values >= 0, so zeroed padding never wins a max
                n = _pool_lengths(n)
            elif i == 2:  # stride-1 time pool: frame j = max(j, j + 1), even frames equal the strided map
                x = F.max_pool2d(F.pad(x, (0, 0, 0, 1)), (2, 2), stride=(1, 2), ceil_mode=True)
        return outs, n


@dataclass(kw_only=True)
class AisfxOptions(AudioEncoderOptions):
    """`model.audio` of "aisfx" (see `AisfxEncoder`); frozen by default."""

    layers: Sequence[int] = (4, 2)
    hop_frames: int = 4
    freeze: bool = True
    trainable_blocks: int = 4
    weights: str | None = None
    pretrained: bool = True


@register_audio_encoder("aisfx", options=AisfxOptions)
class AisfxEncoder(AudioEncoder):
    """The pretrained aisfx CNN as a finelap audio tower: frames (B, T, D) at 44.1 kHz / (1024 * hop_frames).

    layers: blocks whose frequency-mean is concatenated into the frames (1-4; default (4, 2): D = 640).
    hop_frames: 4 (93 ms, dilated block 4; default) or 8 (186 ms, the original network).
    freeze: no gradient into the tower (the default; features can then be cached).
    trainable_blocks: with freeze=False, how many top blocks learn (0-4); BatchNorm statistics stay
      fixed (eval mode) either way.
    weights: the released checkpoint.pth or a converted .safetensors (default: the installed wheel).
    """

    def __init__(
        self,
        layers: Sequence[int] = (4, 2),
        hop_frames: int = 4,
        freeze: bool = True,
        trainable_blocks: int = 4,
        weights: str | None = None,
        lr_mult: float = 1.0,
        pretrained: bool = True,
    ) -> None:
        super().__init__(freeze=False, lr_mult=lr_mult)
        layers = tuple(int(i) for i in layers)
        if not layers or any(i not in (1, 2, 3, 4) for i in layers) or len(set(layers)) != len(layers):
            raise ConfigError(f"aisfx layers must be distinct block numbers in 1-4, got {list(layers)}")
        if not 0 <= int(trainable_blocks) <= 4:
            raise ConfigError(f"aisfx trainable_blocks must be in 0-4, got {trainable_blocks}")
        self.layers = layers
        self.frontend = AisfxFrontEnd()
        self.net = AisfxNet(hop_frames)
        if pretrained:
            self.net.load_state_dict(aisfx_state_dict(weights), strict=True)
        self.dim = sum(CHANNELS[i - 1] for i in layers)
        self.timeline = Timeline(
            frame_rate_hz=SAMPLE_RATE / (HOP * hop_frames), sample_rate=SAMPLE_RATE, hop_length=HOP, downsample=hop_frames
        )
        self.trainable_blocks = int(trainable_blocks)
        self.source = dict(AISFX_SOURCE)
        if freeze:
            self.freeze()
        else:
            self._set_trainable()

    def _set_trainable(self) -> None:
        for i, blk in enumerate(self.net.blocks()):
            for p in blk.parameters():
                p.requires_grad_(i >= 4 - self.trainable_blocks)

    def unfreeze(self) -> None:
        super().unfreeze()
        self._set_trainable()

    def train(self, mode: bool = True) -> "AisfxEncoder":
        super().train(mode)
        for m in self.net.modules():  # pretrained BN statistics are never re-estimated on small batches
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def _encode(self, wave: torch.Tensor, lengths: torch.Tensor, mask_frames: torch.Tensor | None) -> AudioFeatures:
        mel, t_len = self.frontend(wave, lengths)
        if mask_frames is not None:  # hide the mel frames under each masked output frame (SLAP)
            ds = self.timeline.downsample
            hide = mask_frames.to(mel.device).repeat_interleave(ds, dim=1)[:, : mel.shape[1]]
            mel = mel.masked_fill(hide[..., None], 0.0)
        padded = not bool((lengths == wave.shape[1]).all())
        outs, n_frames = self.net(mel, t_len, padded)
        t_out = outs[-1].shape[2]
        feats = []
        for i in self.layers:
            x = outs[i - 1].mean(3)  # (B, C, T_i): mean over frequency
            k = self.net.hop_frames // (_BLOCK_STRIDE[i - 1] if i < 4 else self.net.hop_frames)  # output frames per block frame
            if k > 1:  # earlier blocks run faster than the output: max over each output frame (as the pools do)
                x = F.max_pool1d(x, k, ceil_mode=True)
            feats.append(x)
        frames = torch.cat(feats, 1).transpose(1, 2)  # (B, T, D)
        m = lengths_to_mask(n_frames, t_out)
        frames = frames * m[..., None].to(frames.dtype)
        # clip vector: the masked time-max of the frames (aisfx's own pooling: frequency mean, time max)
        top = frames.masked_fill(~m[..., None], float("-inf")).amax(1)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # (B, D); empty items -> 0
        return AudioFeatures(frames=frames, frame_mask=m, frame_rate_hz=self.timeline.frame_rate_hz, cls=top)

    def cache_key(self) -> str:
        """Identifies these features: the tower config and weights (for the feature cache).
        Computed once and reused until a weight or buffer changes in place (tensor versions)."""
        state = sorted(self.net.state_dict().items())
        versions = tuple(v._version for _, v in state)
        memo = getattr(self, "_cache_key_memo", None)
        if memo is not None and memo[0] == versions:
            return memo[1]
        h = hashlib.sha256(repr(("aisfx", AISFX_VERSION, self.layers, self.net.hop_frames)).encode())
        for k, v in state:
            h.update(k.encode())
            h.update(v.detach().reshape(-1)[:1024].cpu().float().numpy().tobytes())
        key = h.hexdigest()[:16]
        self._cache_key_memo = (versions, key)
        return key
