"""Tiny models, data and configs for fast CPU tests (nothing downloads)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from finelap.data.manifests import write_manifest
from finelap.data.types import Clip, Event

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "sound", "of", "a", "dog", "barking", "cat", "meowing",
         "rain", "falling", "bird", "singing", "car", "horn", "and", "high", "low", "tone", "noise", "beep", "piano", "playing"]
TINY_CNN = dict(dim=32, stem_channels=8, stages=[[8, 2, 2, 2, 1, 1], [16, 2, 2, 1, 2, 2]], norm="layer")


def tiny_text_dir(root: Path) -> Path:
    """A random 1-layer BERT + WordPiece tokenizer saved like a local HF model directory."""
    import transformers as T

    out = root / "tiny_text"
    if (out / "config.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    T.BertTokenizer(str(root / "vocab.txt")).save_pretrained(out)
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=37, max_position_embeddings=64)
    T.BertModel(cfg).save_pretrained(out)
    return out


CLASSES = {"a dog barking": 440.0, "a cat meowing": 880.0, "rain falling": None, "a car horn": 220.0}


def _event_sound(label: str, n: int, rng: np.random.Generator) -> np.ndarray:
    f = CLASSES[label]
    t = np.arange(n) / 16000
    if f is None:
        return 0.3 * rng.standard_normal(n)
    return 0.5 * np.sin(2 * np.pi * f * t) * (1 + 0.1 * rng.standard_normal(n))


def tiny_dataset(root: Path, n: int = 12, seconds: float = 2.0, seed: int = 0) -> Path:
    """Soundscapes with strong labels (even items) and caption-only clips (odd items)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels = list(CLASSES)
    clips = []
    for i in range(n):
        total = int(seconds * 16000)
        x = 0.01 * rng.standard_normal(total)
        lab = labels[i % len(labels)]
        on = float(rng.uniform(0, seconds / 2))
        off = float(min(seconds, on + rng.uniform(0.3, seconds / 2)))
        a, b = int(on * 16000), int(off * 16000)
        x[a:b] += _event_sound(lab, b - a, rng)
        p = root / f"clip{i:03d}.wav"
        sf.write(p, x.astype(np.float32), 16000)
        if i % 2 == 0:
            clips.append(Clip(str(p), events=[Event(lab, round(on, 3), round(off, 3))], labels=[lab], duration=seconds))
        else:
            clips.append(Clip(str(p), captions=[f"{lab} and noise"], labels=[lab], duration=seconds))
    write_manifest(root / "manifest.jsonl", clips)
    return root / "manifest.jsonl"


def tiny_overrides(tmp: Path, manifest: Path, out: str = "run", **extra) -> list[str]:
    text = tiny_text_dir(tmp / "text")
    ov = [
        f"data.train=[{manifest}]",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.phrases_per_clip=4",
        "audio.clip_seconds=2.0",
        "model.audio_encoder=cnn",
        f"model.audio={TINY_CNN}".replace("'", '"'),
        f"model.text.path={text}",
        "model.text.freeze=true",
        "model.embed_dim=16",
        "model.frame_head_heads=2",
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=0",
        "train.ckpt_every=0",
        f"train.out_dir={tmp / out}",
        "train.num_threads=1",
    ]
    return ov + [f"{k}={v}" for k, v in extra.items()]
