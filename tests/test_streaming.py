from __future__ import annotations

import numpy as np
import soundfile as sf
import torch

from finelap.audio import LogMel, MelConfig, Timeline
from finelap.streaming import array_reader, file_reader, plan_windows, stream_frames


class ToyLocalEncoder(torch.nn.Module):
    """Mel -> 3 same-padded convs (receptive field 13 mel frames) -> mean-pool by 4 (ceil)."""

    def __init__(self, mel: MelConfig) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mel = LogMel(mel)
        self.convs = torch.nn.Sequential(*[torch.nn.Conv1d(mel.n_mels if i == 0 else 8, 8, 5, padding=2) for i in range(3)])

    def forward(self, wave, lengths):
        x = self.convs(self.mel(wave) / 50.0)  # (B, 8, Tm)
        pad = (-x.shape[-1]) % 4
        x = torch.nn.functional.pad(x, (0, pad))
        return x.unfold(-1, 4, 4).mean(-1).transpose(1, 2)  # (B, T, 8)


def _stitch(chunks):
    parts = list(chunks)
    starts = [s for s, _ in parts]
    assert starts == sorted(starts)
    return torch.cat([f for _, f in parts])


def test_plan_covers_every_frame_once():
    tl = Timeline.from_mel(MelConfig(), 4)
    n = 16000 * 137 + 123
    ws = plan_windows(n, tl, window_s=10.0, margin_s=1.0)
    covered = np.concatenate([np.arange(w.keep_start, w.keep_end) for w in ws])
    np.testing.assert_array_equal(covered, np.arange(tl.num_frames_for_samples(n)))
    assert all(w.read_start % 640 == 0 and w.read_end <= n for w in ws)


def test_stitched_equals_one_pass():
    mel = MelConfig()
    tl = Timeline.from_mel(mel, 4)
    enc = ToyLocalEncoder(mel).eval()
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(16000 * 23 + 77)).astype(np.float32)
    with torch.inference_mode():
        full = enc(torch.from_numpy(wave)[None], None)[0]
    assert full.shape[0] == tl.num_frames_for_samples(len(wave))
    stitched = _stitch(stream_frames(enc, array_reader(wave), len(wave), tl, window_s=5.0, margin_s=0.5, batch_windows=2))
    assert stitched.shape == full.shape
    torch.testing.assert_close(stitched, full, atol=1e-4, rtol=1e-4)


def test_short_audio_and_file_reader(tmp_path):
    mel = MelConfig()
    tl = Timeline.from_mel(mel, 4)
    enc = ToyLocalEncoder(mel).eval()
    tiny = np.zeros(100, np.float32)  # shorter than one frame
    out = _stitch(stream_frames(enc, array_reader(tiny), len(tiny), tl))
    assert out.shape == (1, 8)
    # file at another sample rate: windowed reads match reading the whole file
    rng = np.random.default_rng(1)
    x = (0.1 * rng.standard_normal(22050 * 12)).astype(np.float32)
    p = tmp_path / "x.flac"
    sf.write(p, x, 22050)
    read, n = file_reader(p, 16000)
    from finelap.audio import load_audio

    whole = load_audio(p, 16000)
    assert abs(n - len(whole)) <= 1
    full = _stitch(stream_frames(enc, array_reader(whole), len(whole), tl, window_s=3.0, margin_s=0.5))
    win = _stitch(stream_frames(enc, read, n, tl, window_s=3.0, margin_s=0.5))
    torch.testing.assert_close(win[: len(full)], full[: len(win)], atol=2e-3, rtol=1e-3)


def test_cnn_encoder_layer_norm_streams_seamlessly():
    """The default CNN (norm="layer", fixed input norm) is local in time: windowed = one pass."""
    from finelap.models.audio_encoders import CNNEncoder

    torch.manual_seed(0)
    enc = CNNEncoder(dim=32, stem_channels=8, stages=[[8, 2, 2, 2, 1, 1], [16, 2, 2, 1, 2, 2]], norm="layer").eval()
    rng = np.random.default_rng(2)
    wave = (0.1 * rng.standard_normal(16000 * 13 + 5)).astype(np.float32)
    fn = lambda w, l: enc(w, l).frames  # noqa: E731
    with torch.inference_mode():
        full = fn(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))[0]
    stitched = _stitch(stream_frames(fn, array_reader(wave), len(wave), enc.timeline, window_s=4.0, margin_s=1.0, batch_windows=3))
    assert stitched.shape == full.shape
    torch.testing.assert_close(stitched, full, atol=1e-4, rtol=1e-4)
