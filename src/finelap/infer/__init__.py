"""Inference: `Pipeline.from_pretrained(dir)` answers questions about audio files of any length.

    pipe = finelap.Pipeline.from_pretrained("runs/finelap/final")
    pipe.embed_audio(["a.wav", "b.flac"])                 # (2, D) clip embeddings, L2-normalised
    pipe.classify("a.wav", ["dog", "rain", "siren"])      # [{"label": "dog", "score": 0.81}, ...]
    pipe.detect("street.flac", ["dog", "car horn"])       # [{"onset", "offset", "score", "label"}, ...]
    pipe.ground("park.wav", "a dog barking")              # [{"onset", "offset", "score", "label"}, ...]
    fs = pipe.frame_scores("park.wav", ["a dog barking"]) # FrameScores: (T, N) probabilities in seconds

Results are dicts, as Hugging Face pipelines return them. One clip is:
- a path (any format soundfile reads; resampled to the model's rate);
- an array or tensor with its rate, `sample_rate=` (required: raw samples have no default rate):
  (samples,) mono, or (samples, channels) / (channels, samples), downmixed to mono (channel
  mean); the channel axis is the dimension of at most 8, or `channel_axis=` says which;
- an HF-style dict {"array" (or "raw"): samples, "sampling_rate": Hz}, e.g. a `datasets` row.
A batch is a list (or tuple) of clips, and gives a list of results, one per clip; a 2-D array
is one multichannel clip, never a batch. Everything is deterministic:

- clip embeddings of audio longer than `audio.max_seconds` are the coverage-weighted mean of the
  clip embeddings of fixed `audio.clip_seconds` windows on a grid starting at 0 (the last window is
  moved back to end at the end of the audio), renormalised; never random crops;
- frame-level outputs of any length are streamed through `finelap.streaming`: windows of
  `window_s` on the encoder's frame grid, read from disk window by window with `margin_s` of
  context on both sides and stitched. For encoders whose receptive field fits in the margin the
  result equals one-pass encoding; memory is O(window) whatever the duration. On CPU, windows
  (and clip-embedding batches) run on `workers` threads with a share of torch's threads each:
  window-level parallelism keeps both cores busy even on a loaded machine, where op-level
  threads mostly wait for each other (measured 3.7x faster on 2 busy cores; benchmarks/long_audio.py).

Prompts: every label or phrase becomes the text query through `finelap.scoring.make_prompt` with
the checkpoint's `eval.prompt_template` (underscores as spaces), in classify, detect, ground,
frame_scores and the evaluators alike. Detection settings (threshold, per-class thresholds, median
filter, minimum duration, merge gap; seconds) come from the checkpoint's calibration
(`finelap calibrate`; else its eval defaults) unless given, and are announced once per Pipeline.

Probabilities: sigmoid of the frame logits, or FLAM's logit-adjusted probability
p / (p + sigmoid(beta_text)) when the model has per-text frame biases
(`model.text_conditioned_scale_bias`); `calibrated=None` picks automatically.

The package, by seam: `pipeline` (`Pipeline`, the loaded model and its questions), `sources`
(inputs -> readable sources, decoding, the thread pool, streaming windows), `labels` (label lists
and prompts), `postprocess` (detection settings, frame scores -> events), `index` (the search-index
contract). Everything public is importable from `finelap.infer`.
"""
from __future__ import annotations

from ..eval.plots import display_mel_stream
from ..scoring import FrameScores
from .labels import parse_labels, split_labels
from .pipeline import NO_CHECKPOINT_HELP, FrameEmbeddings, Pipeline
from .sources import AudioInput, find_audio_files

__all__ = [
    "Pipeline", "FrameScores", "FrameEmbeddings", "AudioInput", "parse_labels", "split_labels", "find_audio_files",
    "display_mel_stream", "NO_CHECKPOINT_HELP",
]  # fmt: skip
