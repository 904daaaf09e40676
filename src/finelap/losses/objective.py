"""Objectives as plug-ins: the `Objective` interface, the step context they read, and the batch's texts.

An objective is one class in one module of ``finelap.losses``, registered by name with
`register_objective` (it fills ``finelap.registry.LOSSES``). It declares

- ``name``: its registry name, the value its config field takes (``loss.frame: finelap``);
- ``slot``: the `LossConfig` field that switches it on ("clip" | "frame" | "distill" | "caption");
- ``all_terms``: every term name it can produce ("group/name", weighted by name);
- ``needs``: the inputs it reads (names of `LossInputs` fields, or new names of its own);
- ``own_options``: LossConfig fields only it reads (setting one while it is off is an error);
- ``frame_rows``: whose frame embeddings it reads: "all" clips, only the "labelled" ones (clips
  with strong labels, ``has_frames``; the trainer then runs the frame head on those rows only) or
  "none"; by default "all" when ``needs`` names ``frame_embeds``, else "none";

and implements two stages:

- ``gather(cfg, ctx) -> {input name: value}``: reads what it needs from the batch and the
  model outputs of the step (`StepContext`); runs once per step, inside the training loop;
- ``compute(cfg, x, rank, world_size) -> {term: 0-dim tensor or None}``: the pure loss over
  tensors (``x`` maps input names to values; None for a term absent from this batch).

`finelap.losses.compose.compute_losses` runs ``compute`` of every enabled objective and weights
the terms by name; `gather_inputs` runs their ``gather``. See docs/architecture.md ("Adding an
objective").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, TypeVar

import torch

from ..data.batching import Batch
from ..data.phrases import PhraseClusters
from ..dist import all_reduce_sum
from ..loss_config import KIND_SLOTS, SLOTS, LossConfig
from ..models.model import AudioOutput, TextOutput
from ..registry import LOSSES

__all__ = ["Objective", "StepContext", "StepTexts", "step_texts", "register_objective", "any_rank"]

Inputs = Mapping[str, Any]


@dataclass
class StepTexts:
    """The batch's distinct texts (captions and phrases) and where each clip's texts sit in it."""

    texts: list[str]
    caption_index: torch.Tensor  # (B,) long
    phrase_index: torch.Tensor  # (B, K) long (padding slots point at 0; masked)
    flam_index: torch.Tensor  # (N,) long: distinct phrases, FLAM's text set
    flam_cluster: torch.Tensor  # (N,) long cluster id, -1 unknown


def step_texts(batch: Batch, clusters: PhraseClusters | None, phrase_template: str | None = None) -> StepTexts:
    """The batch's texts. Captions are encoded as written; phrases (frame-level queries) as the
    prompts inference will use (`finelap.scoring.make_prompt` with `phrase_template`, normally the
    checkpoint's eval.prompt_template), so training and detection score the same text; None keeps
    phrases as written."""
    from ..scoring import make_prompt

    index: dict[str, int] = {}
    texts: list[str] = []

    def idx(t: str) -> int:
        if t not in index:
            index[t] = len(texts)
            texts.append(t)
        return index[t]

    def pidx(p: str) -> int:
        return idx(make_prompt(phrase_template, p) if phrase_template is not None else p)

    cap = [idx(c) if c else 0 for c in batch.captions]
    ph = [[pidx(p) if p else 0 for p in ps] for ps in batch.phrases]
    distinct = sorted({p for ps in batch.phrases for p in ps if p})
    flam = [pidx(p) for p in distinct]
    cl = [(clusters.cluster_of(p) if clusters is not None else None) for p in distinct]
    if not texts:
        texts.append("")
    return StepTexts(
        texts,
        torch.tensor(cap, dtype=torch.long),
        torch.tensor(ph, dtype=torch.long).reshape(len(batch.phrases), -1),
        torch.tensor(flam, dtype=torch.long),
        torch.tensor([-1 if c is None else c for c in cl], dtype=torch.long),
    )


@dataclass
class StepContext:
    """What `Objective.gather` reads for one step (B clips of this rank, N distinct texts).

    batch: the rank's `Batch` (captions, phrase sets, frame targets, has_caption/has_frames, ...).
    audio: `AudioOutput` of the whole batch (audio_embeds (B, D), frame_embeds (B, T, D),
        frame_mask (B, T), frames (B, T, Da)); detached leaves under gradient caching.
    text: `TextOutput` of ``texts.texts`` (text_embeds (N, D); per-text frame_logit_scale /
        frame_logit_bias (N,) when the model predicts them).
    texts: `StepTexts`: which text is each clip's caption and phrase slots.
    model: the model, for its logit scales and biases (``clip_scale_and_bias()``,
        ``frame_scale_and_bias(text)``) and ``timeline``.
    clusters: the phrase clusters (FLAM's labels of every audio-text pair), or None.
    extra: inputs made by extra model passes outside the ordinary forward (SLAP's hook:
        student/teacher frames, caption logits), by input name.
    """

    batch: Batch
    audio: AudioOutput
    text: TextOutput
    texts: StepTexts
    model: Any
    clusters: PhraseClusters | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """Whether any rank has the term; ranks must agree, since the losses run collectives."""
    if world_size == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0], device=device)).item() > 0)


def input_device(x: Inputs) -> torch.device:
    """The device of the step's tensors (that of the first of the usual reference inputs)."""
    for name in ("audio_embeds", "frame_embeds", "student_frames", "caption_logits"):
        if isinstance(x.get(name), torch.Tensor):
            return x[name].device
    return torch.device("cpu")


class Objective:
    """One training objective (see the module docstring). Instances are stateless: options come
    from the `LossConfig` passed to every method."""

    name: ClassVar[str]
    slot: ClassVar[str]
    all_terms: ClassVar[tuple[str, ...]]
    needs: ClassVar[tuple[str, ...]] = ()
    own_options: ClassVar[tuple[str, ...]] = ()
    frame_rows: ClassVar[str | None] = None

    def frame_rows_read(self) -> str:
        """"all" | "labelled" | "none": whose frame embeddings ``compute`` can depend on."""
        if self.frame_rows is not None:
            return self.frame_rows
        return "all" if "frame_embeds" in self.needs else "none"

    def selected(self, cfg: LossConfig) -> bool:
        """Whether ``cfg`` switches this objective on (by default: its slot holds its name)."""
        return getattr(cfg, self.slot) == self.name

    def describe(self) -> str:
        """How a config selects it, for messages: "clip=sigmoid", "caption"."""
        return f"{self.slot}={self.name}" if self.slot in KIND_SLOTS else self.slot

    def terms(self, cfg: LossConfig) -> list[str]:
        """The terms it produces under ``cfg`` (a subset of ``all_terms``, in a fixed order)."""
        return list(self.all_terms)

    def check(self, cfg: LossConfig) -> None:
        """Raise ConfigError for settings it cannot honour (called when ``cfg`` is built, if enabled)."""

    def gather(self, cfg: LossConfig, ctx: StepContext) -> dict[str, Any]:
        """Its inputs for one step, read from the batch and the model outputs."""
        return {}

    def compute(self, cfg: LossConfig, x: Inputs, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor | None]:
        """Its terms over the inputs ``x``; a term absent from this batch is None or left out."""
        raise NotImplementedError

    def need(self, x: Inputs, name: str, term: str | None = None) -> Any:
        """``x[name]``, or a ValueError naming the term and the missing input."""
        value = x.get(name)
        if value is None:
            raise ValueError(f"loss term {term or self.all_terms[0]} needs the input {name!r} (LossInputs.{name})")
        return value


O = TypeVar("O", bound=type)


def register_objective(cls: O) -> O:
    """Class decorator: check the declaration and register an instance under ``cls.name``."""
    for attr in ("name", "slot", "all_terms"):
        if not getattr(cls, attr, None):
            raise TypeError(f"objective {cls.__name__} must declare {attr}")
    if getattr(cls, "frame_rows", None) not in (None, "all", "labelled", "none"):
        raise TypeError(f"objective {cls.__name__}: frame_rows must be 'all', 'labelled' or 'none', got {cls.frame_rows!r}")
    if cls.slot not in SLOTS:
        raise TypeError(f"objective {cls.__name__}: slot {cls.slot!r} is not a LossConfig slot {SLOTS}")
    for term in cls.all_terms:
        if term.count("/") != 1 or not all(term.split("/")):
            raise TypeError(f"objective {cls.__name__}: term {term!r} must be 'group/name'")
    LOSSES.register(cls.name)(cls())
    return cls
