"""The training loop: one readable function, `train(cfg)`.

Setup, then `for step`: forward, named losses, backward, clip, step, log, eval, checkpoint.
Features are small functions beside it: gradient caching for accumulation that keeps the full
negative pool (`_accumulated_backward`), EMA (`ema_update`), DDP gradient averaging
(`_sync_gradients`), the LR schedule (`lr_lambda`).

Exact resume: the batch at step s is a pure function of (seed, s) (see data.batching), and the
model, optimizer, scheduler, EMA and RNG states are restored from the checkpoint, so N steps +
resume + N steps equals 2N steps bit for bit.
"""
from __future__ import annotations

import csv
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .. import dist
from ..config import RunConfig, save_config
from ..data.batching import Batch, ClipDataset, Collate, MixedBatchSampler, split_by_supervision
from ..data.phrases import PhraseClusters
from ..data.types import Clip
from ..errors import CheckpointError, ConfigError, FinelapError
from ..losses.aux import ema_update  # re-exported: the one EMA helper (EMA weights and SLAP's teacher)
from ..losses.compose import LossConfig, compute_losses, frame_rows_needed, gather_inputs
from ..losses.frame import cluster_activity  # re-exported (FLAM's targets)
from ..losses.objective import StepContext, StepTexts, step_texts  # re-exported
from ..models.build import build_model, checkpoint_state, complete_state
from ..models.model import AudioOutput, FineLAPModel, TextOutput, param_groups
from ..utils import log
from .slap import SLAPState, needs_slap_modules
from .checkpoint import (
    checkpoint_name, load_checkpoint, restore_rng, restore_training_state, rotate_checkpoints, save_checkpoint,
)  # fmt: skip


# ----------------------------------------------------------------------------- small features


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base LR: linear warm-up, then cosine/linear decay to `min_ratio`, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _sync_gradients(model: torch.nn.Module, world_size: int) -> None:
    """Average gradients over ranks (what DDP does), so that with the losses' gather convention
    (finelap.dist) every rank holds the single-process gradient of the global loss.

    A parameter may have a gradient on some ranks only (e.g. the frame head, run only on clips
    with strong labels, on a rank that has none): missing gradients count as zeros, and a
    parameter keeps no gradient only when no rank has one."""
    if world_size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    ref = next((p.grad for p in params if p.grad is not None), params[0])
    present = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=ref.device, dtype=ref.dtype)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p, dtype=ref.dtype)).reshape(-1) for p in params] + [present])
    torch.distributed.all_reduce(flat)
    had = (flat[len(flat) - len(params) :] > 0).tolist()  # one device sync, not one per parameter
    i = 0
    for p, any_rank_had in zip(params, had):
        n = p.numel()
        if any_rank_had:
            g = (flat[i : i + n] / world_size).view_as(p)
            if p.grad is None:
                p.grad = g.to(p.dtype).clone()
            else:
                p.grad.copy_(g)
        i += n


# ----------------------------------------------------------------------------- one step's forward


def _audio_reps(model: FineLAPModel, wave: torch.Tensor, lengths: torch.Tensor, frame_rows: torch.Tensor | None = None,
                digests: Sequence[str] | None = None, decoded: Sequence[bool] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    a = model.encode_audio(wave, lengths, frame_rows=frame_rows, wave_digests=digests, wave_decoded=decoded)
    return {"audio_embeds": a.audio_embeds, "frame_embeds": a.frame_embeds, "frame_mask": a.frame_mask, "frames": a.frames}


def _text_reps(model: FineLAPModel, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    t = model.encode_text(list(texts))
    out = {"text_embeds": t.text_embeds}
    if t.frame_logit_scale is not None:
        out["alpha"], out["beta"] = t.frame_logit_scale, t.frame_logit_bias
    return out


def losses_from_reps(
    model: FineLAPModel,
    loss_cfg: LossConfig,
    batch: Batch,
    st: StepTexts,
    a: dict[str, torch.Tensor],
    t: dict[str, torch.Tensor],
    clusters: PhraseClusters | None,
    rank: int,
    world_size: int,
    extra: dict | None = None,
) -> dict[str, torch.Tensor]:
    """The loss terms of the whole (per-rank) batch from its audio/text representations (``a``
    from `_audio_reps`, ``t`` from `_text_reps`) and the SLAP hook's ``extra`` inputs: every
    enabled objective gathers its inputs (`gather_inputs`), then `compute_losses`."""
    audio = AudioOutput(a["audio_embeds"], a["frame_embeds"], a["frame_mask"], model.frame_rate_hz, model.timeline, a["frames"])
    text = TextOutput(t["text_embeds"], frame_logit_scale=t.get("alpha"), frame_logit_bias=t.get("beta"))
    ctx = StepContext(batch, audio, text, st, model, clusters, dict(extra or {}))
    return compute_losses(loss_cfg, gather_inputs(loss_cfg, ctx), rank, world_size)


def _frame_rows(loss_cfg: LossConfig, batch: Batch) -> torch.Tensor | None:
    """(B,) bool: the clips whose frame embeddings the losses read (`frame_rows_needed`), so the
    frame head skips the others (half of a captions+events batch); None: all of them."""
    need = frame_rows_needed(loss_cfg)
    if need == "all":
        return None
    if need == "none":
        return torch.zeros(batch.size, dtype=torch.bool, device=batch.has_frames.device)
    return batch.has_frames.to(torch.bool)


def _digests(batch: Batch, sl: slice) -> list[str] | None:
    return None if batch.wave_digests is None else batch.wave_digests[sl]


def _decoded(batch: Batch, sl: slice) -> list[bool] | None:
    return None if batch.wave_decoded is None else batch.wave_decoded[sl]


def _cat_pad(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding dim 1 (frames) to the longest part."""
    if parts[0].dim() < 2:
        return torch.cat(parts)
    t = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, t - p.shape[1])) for p in parts])


def forward_backward(
    model: FineLAPModel,
    loss_cfg: LossConfig,
    batch: Batch,
    clusters: PhraseClusters | None,
    accum_steps: int = 1,
    autocast: Callable[[], Any] = nullcontext,
    rank: int = 0,
    world_size: int = 1,
    slap: SLAPState | None = None,
    step: int = 0,
    phrase_template: str | None = None,
) -> dict[str, float]:
    """Forward, losses over the whole batch, backward. Returns the loss terms as floats.

    With accum_steps > 1 this is gradient caching (GradCache): micro-batches are first encoded
    without a graph, the loss is taken over the full batch's embeddings (so every clip still sees
    the full negative pool), and each micro-batch is then re-encoded with its RNG state replayed
    and back-propagated with the cached embedding gradients. The result equals one step on the
    full batch (up to float rounding) for encoders without batch statistics (GroupNorm, LayerNorm).
    """
    st = step_texts(batch, clusters, phrase_template)
    rows = _frame_rows(loss_cfg, batch)
    if accum_steps <= 1:
        with autocast():
            a = _audio_reps(model, batch.wave, batch.lengths, rows, batch.wave_digests, batch.wave_decoded)
            t = _text_reps(model, st.texts)
            extra = slap.inputs(model, batch, step, rank, a["frames"], a["frame_mask"]) if slap is not None else None
        terms = losses_from_reps(model, loss_cfg, batch, st, a, t, clusters, rank, world_size, extra)
        terms["loss"].backward()
        return {k: float(v.detach()) for k, v in terms.items()}

    b = batch.size
    bounds = np.linspace(0, b, accum_steps + 1).round().astype(int)
    slices = [slice(int(s), int(e)) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    rng_states = []
    cached: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for sl in slices:
            rng_states.append(torch.get_rng_state())
            with autocast():
                cached.append(_audio_reps(model, batch.wave[sl], batch.lengths[sl], None if rows is None else rows[sl], _digests(batch, sl), _decoded(batch, sl)))
        text_rng = torch.get_rng_state()
        with autocast():
            t_cached = _text_reps(model, st.texts)
    a_full = {k: _cat_pad([c[k] for c in cached]) for k in cached[0]}
    a_leaf = {k: (v.detach().float().requires_grad_(True) if v.is_floating_point() else v) for k, v in a_full.items()}
    t_leaf = {k: v.detach().float().requires_grad_(True) for k, v in t_cached.items()}
    terms = losses_from_reps(model, loss_cfg, batch, st, a_leaf, t_leaf, clusters, rank, world_size)
    terms["loss"].backward()
    after = torch.get_rng_state()
    for sl, state, c in zip(slices, rng_states, cached):
        torch.set_rng_state(state)
        with autocast():
            reps = _audio_reps(model, batch.wave[sl], batch.lengths[sl], None if rows is None else rows[sl], _digests(batch, sl), _decoded(batch, sl))
        outs, grads = [], []
        for k, v in reps.items():
            g = a_leaf[k].grad if isinstance(a_leaf[k], torch.Tensor) and a_leaf[k].requires_grad else None
            if g is None or not v.requires_grad:
                continue
            outs.append(v)
            grads.append(g[sl][:, : v.shape[1]] if v.dim() > 1 else g[sl])
        if outs:
            torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads)])
    torch.set_rng_state(text_rng)
    with autocast():
        reps_t = _text_reps(model, st.texts)
    outs = [v for k, v in reps_t.items() if v.requires_grad and t_leaf[k].grad is not None]
    grads = [t_leaf[k].grad.to(v.dtype) for k, v in reps_t.items() if v.requires_grad and t_leaf[k].grad is not None]
    if outs:
        torch.autograd.backward(outs, grads)
    torch.set_rng_state(after)
    return {k: float(v.detach()) for k, v in terms.items()}


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: FineLAPModel, clips: Sequence[Clip], cfg: RunConfig, max_clips: int | None = None) -> dict[str, float]:
    """Validation through the same evaluators as `finelap eval` (functions, not models: the model
    is wrapped in a `Pipeline` and passed as `Pipeline.evaluatable()`), so what training reports
    equals what `finelap eval` reports on the same data and weights:

    - clips with labels: `evaluate_zeroshot` -> ``val/top1_accuracy``, ``val/top5_accuracy``
      (single-label sets), ``val/mAP``;
    - when some clips have strong labels: `evaluate_sed` on all clips (those without events are
      negative files, as in `finelap eval sed --data VAL`) with the run's detection settings (its
      calibration when it has one, else eval.*) -> ``val/PSDS1``, ``val/PSDS2``,
      ``val/event_F1``, ``val/frame_AUROC``.
    """
    from ..eval.tasks import evaluate_sed, evaluate_zeroshot
    from ..infer import Pipeline
    from ..scoring import resolve_detection_settings

    was_training = model.training
    clips = list(clips)[:max_clips] if max_clips else list(clips)
    out: dict[str, float] = {}
    try:
        pipe = Pipeline(model, cfg, device=next(model.parameters()).device)
        fns = pipe.evaluatable(name="validation", batch_size=cfg.data.eval_batch_size)
        labels = list(cfg.eval.labels) or None
        labelled = [c for c in clips if c.labels and (labels is None or set(c.labels) <= set(labels))]
        if labelled:
            try:
                zs = evaluate_zeroshot(fns, labelled, labels=labels, batch_size=cfg.data.eval_batch_size, n_examples=0)
                out.update({f"val/{k}": float(zs[k]) for k in ("top1_accuracy", "top5_accuracy", "mAP") if zs.get(k) is not None})
            except FinelapError as e:  # e.g. every file unreadable: report, do not stop training
                log(f"validation: zero-shot skipped ({e})")
        if any(c.events for c in clips):  # every clip, as `finelap eval sed --data VAL`: those without events are negatives
            classes = sorted({e.label for c in clips for e in c.events})
            pp = resolve_detection_settings(cfg.eval, classes).postprocess
            try:
                sed = evaluate_sed(fns, clips, postprocess=pp, n_examples=0)
                out.update({f"val/{k}": float(sed[k]) for k in ("PSDS1", "PSDS2", "event_F1", "frame_AUROC") if sed.get(k) is not None})
            except Exception as e:  # noqa: BLE001 (a metric that cannot be computed must not stop training)
                log(f"validation: SED skipped ({type(e).__name__}: {e})")
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------- the loop


def _load_clips(paths: Sequence[str], what: str) -> list[Clip]:
    from ..data.manifests import load_clips

    clips: list[Clip] = []
    for p in paths:
        clips.extend(load_clips(p))
    if not clips and what == "train":
        raise ConfigError("data.train is empty: give one or more manifests, e.g. data.train=[path/to/manifest.jsonl]")
    return clips


def _phrase_variants(paths: Sequence[str], labels: Sequence[str]) -> dict[str, list[str]]:
    """Natural variants per label: a phrase bank saved next to the training data (finelap synth
    writes one) where present, else the built-in bank (hand-written entries + rule-based fallback)."""
    from ..data.captions import PhraseBank

    bank = PhraseBank.default()
    for p in paths:
        for d in (Path(p).parent, Path(p).parent.parent):
            if (d / "phrase_bank.json").exists():
                bank = PhraseBank.from_json(d / "phrase_bank.json")
                break
    return bank.as_mapping(labels)


def build_clusters(model: FineLAPModel, clips: Sequence[Clip], cfg: RunConfig) -> PhraseClusters | None:
    labels = sorted({e.label for c in clips for e in c.events} | {lab for c in clips for lab in c.labels})
    if not labels:
        return None
    if cfg.data.phrase_bank:
        return PhraseClusters.load(cfg.data.phrase_bank)
    variants = _phrase_variants(cfg.data.train, labels)

    @torch.no_grad()
    def embed(texts: list[str]) -> np.ndarray:
        return model.text.embed_cached(texts).float().cpu().numpy()

    return PhraseClusters.build(labels, variants, embed, threshold=cfg.data.cluster_threshold)


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint and exits cleanly at the step's end."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Stop":
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.signum = signum
        log(f"finelap train: received {signal.Signals(signum).name}; saving a checkpoint after this step and exiting")

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _skip_decode(model: FineLAPModel, slap: Any) -> Any:
    """`ClipDataset.skip_decode` when every audio forward of a step reads the on-disk feature
    cache (a frozen tower, a cache folder, no SLAP: its masked student and teacher read the
    waveform): the loading workers then skip decoding inputs whose features are cached, so a
    warm-cache step costs the heads only. None otherwise."""
    from ..models.feature_cache import CachedOnDisk

    fc = model.feature_cache
    if fc is None or fc.folder is None or slap is not None:
        return None
    return CachedOnDisk(fc.folder, model.audio.cache_key())


def _feature_cache(model: FineLAPModel, cfg: RunConfig) -> Any:
    """A FeatureCache for a frozen pretrained audio tower (see train.feature_cache), else None."""
    from ..models.feature_cache import FeatureCache, supports_feature_cache
    from ..models.pretrained import cache_dir

    mode = cfg.train.feature_cache
    if mode == "off" or not supports_feature_cache(model.audio):
        return None
    folder = None if mode == "memory" else (cache_dir() / "features" if mode == "auto" else Path(mode))
    return FeatureCache(folder)


def train(cfg: RunConfig, resume: str | bool | None = None, progress: bool = True, stop_after: int | None = None) -> Path:
    """Train `cfg`; returns the final checkpoint directory. `resume`: True (the run's latest
    checkpoint), a checkpoint/run directory, or None. `stop_after`: interrupt at this step as a
    signal would (save a resumable checkpoint and return it), for schedulers and tests.
    Under torchrun every rank returns the same path, at the same step."""
    info = dist.init_distributed(device=None if cfg.train.device == "auto" else cfg.train.device)
    clean = False
    try:
        out = _train(cfg, info, resume, progress, stop_after)
        clean = True
        return out
    finally:
        dist.shutdown_distributed(info, clean=clean)


def _train(cfg: RunConfig, info: dist.DistInfo, resume: str | bool | None, progress: bool, stop_after: int | None) -> Path:
    rank, ws = info.rank, info.world_size
    device = torch.device(info.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    run_dir = Path(cfg.train.out_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml", also_json=False)  # a config.json would make the run dir look like a checkpoint
    loss_cfg = cfg.loss if isinstance(cfg.loss, LossConfig) else LossConfig(**cfg.loss)

    model = build_model(cfg)
    model = model.to(device)
    model.feature_cache = _feature_cache(model, cfg)
    train_clips = _load_clips(cfg.data.train, "train")
    val_clips = _load_clips(cfg.data.val, "val") if cfg.data.val else []
    clusters = build_clusters(model, train_clips, cfg)
    if rank == 0 and clusters is not None:
        clusters.save(run_dir / "phrase_clusters.json")

    opt = torch.optim.AdamW(param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.lr_mult), lr=cfg.train.lr)
    total = cfg.train.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, cfg.train.warmup_steps, total, cfg.train.schedule, cfg.train.min_lr_ratio)
    )
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if cfg.train.ema_decay else None
    slap = SLAPState.create(model, cfg) if needs_slap_modules(cfg) else None
    step = 0
    rng_state = None  # restored right before the first step (see below)
    if resume:
        src = run_dir if resume is True else Path(resume)
        ckpt = load_checkpoint(src)
        model.load_state_dict(complete_state(model, ckpt.state_dict))
        if ema is not None and ckpt.ema_state:
            ema = {k: v.to(device) for k, v in complete_state(model, ckpt.ema_state).items()}
        step = restore_training_state(ckpt, opt, sched, rng=False)
        rng_state = ckpt.rng_state
        if rng_state is None:
            raise CheckpointError(f"{ckpt.path}: cannot resume: the checkpoint has no RNG state")
        if slap is not None:
            slap.load_state_dict((ckpt.trainer_state or {}).get("slap"), model)
        if _frozen_text(model):  # after load_state_dict, which invalidates the cache
            model.text.load_cache_state((ckpt.trainer_state or {}).get("text_cache"))
        if rank == 0:
            log(f"finelap train: resumed from {ckpt.path} at step {step}")

    # data: each rank takes its slice of the global batch at every step
    per_rank = cfg.data.batch_size // ws
    if per_rank * ws != cfg.data.batch_size:
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) must be divisible by the number of processes ({ws})")
    groups = split_by_supervision(train_clips)
    durations = [c.duration or cfg.audio.clip_seconds for c in train_clips]
    sampler = MixedBatchSampler(
        groups, cfg.data.mix, cfg.data.batch_size, seed=cfg.train.seed, start_step=step, max_steps=total,
        durations=durations, buckets=cfg.data.num_buckets if cfg.data.bucket_by_duration else 1,
    )  # fmt: skip
    dataset = ClipDataset(
        train_clips, model.sample_rate, cfg.audio.clip_seconds, random_crop=True, clusters=clusters,
        phrases_per_clip=cfg.data.phrases_per_clip, seed=cfg.train.seed, caption_template=cfg.data.caption_template,
    )  # fmt: skip
    dataset.skip_decode = _skip_decode(model, slap)

    class _RankSlice(torch.utils.data.Sampler):
        def __iter__(self):
            for keys in sampler:
                yield keys[rank * per_rank : (rank + 1) * per_rank]

        def __len__(self):
            return len(sampler)

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_RankSlice(), collate_fn=Collate(model.timeline, cfg.data.phrases_per_clip, digests=model.feature_cache is not None),
        num_workers=cfg.data.num_workers, persistent_workers=False,
    )  # fmt: skip
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.train.precision == "bf16" else nullcontext

    log_path = run_dir / "metrics.csv"
    writer = _MetricsLog(log_path, step, enabled=rank == 0)
    tb = _tensorboard(run_dir) if rank == 0 else None
    skipped: list[str] = []
    t_start = time.time()
    t_last = time.time()
    last_logged = step
    model.train()
    bar = _progress(total, step, enabled=progress and rank == 0)
    stop_reason = "max_steps"
    batches = iter(loader)
    if rng_state is not None:
        # after iter(loader), which draws a seed from the global torch RNG: restoring before it would
        # shift every later dropout mask, and the resumed run would no longer equal the straight one
        restore_rng(rng_state)
    with _Stop() as stopper:
        for batch in batches:
            batch = batch.to(device)
            skipped.extend(batch.skipped)
            terms = forward_backward(model, loss_cfg, batch, clusters, cfg.train.accum_steps, autocast, rank, ws, slap, step,
                                     phrase_template=cfg.eval.prompt_template)  # fmt: skip
            _sync_gradients(model, ws)
            # the global norm is computed even without clipping: a non-finite gradient must stop the run
            # before opt.step() writes NaN into the weights (and into the next checkpoint)
            max_norm = cfg.train.grad_clip if cfg.train.grad_clip is not None else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            # Every reason to stop is agreed by all ranks here, once per step: a rank that left alone
            # (its own clock, a signal only it received, a NaN only in its share) would leave the others
            # waiting in the next collective until the process-group timeout.
            non_finite, signalled, out_of_time = dist.any_rank([
                not math.isfinite(grad_norm) or not all(math.isfinite(v) for v in terms.values()),
                stopper.signum is not None,
                cfg.train.max_minutes is not None and (time.time() - t_start) / 60 >= cfg.train.max_minutes,
            ], device)  # fmt: skip
            if non_finite:
                dist.barrier()  # every rank raises at this same step
                raise FinelapError(
                    f"non-finite loss or gradient at step {step + 1} (rank {rank}: loss terms {terms}, grad norm {grad_norm}); "
                    "the weights were not updated. Check the data, or lower train.lr"
                )
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            if ema is not None:
                ema_update(ema, model, cfg.train.ema_decay)
            if slap is not None:
                slap.update(model)
            bar(step, terms["loss"])
            halted = stop_after is not None and step >= stop_after  # the same on every rank
            ending = step == total or signalled or halted or out_of_time
            if step % cfg.train.log_every == 0 or ending:  # the last step is always logged
                now = time.time()
                row = {"step": step, "lr": sched.get_last_lr()[0], **{f"train/{k}": v for k, v in terms.items()}}
                row["grad_norm"] = grad_norm
                row["sec_per_step"] = (now - t_last) / max(1, step - last_logged)
                last_logged = step
                row["skipped_files"] = len(skipped)
                t_last = now
                writer.write(row)
                if tb is not None:
                    for k, v in row.items():
                        if isinstance(v, (int, float)) and v is not None and k != "step":
                            tb.add_scalar(k, v, step)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and val_clips and rank == 0:
                metrics = _validate_with(model, ema, val_clips, cfg)
                writer.write({"step": step, **metrics})
                log(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            # only the flags agreed above decide from here on (a signal arriving now waits for the next step)
            if out_of_time:
                stop_reason = "max_minutes"
            if signalled:
                stop_reason = signal.Signals(stopper.signum).name if stopper.signum is not None else "signal on another rank"
            if halted and step < total:
                stop_reason = f"stop_after={stop_after}"
                _save(run_dir / checkpoint_name(step), model, ema, opt, sched, cfg, step, clusters, rank, slap)
                dist.barrier()
                return run_dir / checkpoint_name(step)
            periodic = cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0
            if (periodic or signalled) and step < total:
                _save(run_dir / checkpoint_name(step), model, ema, opt, sched, cfg, step, clusters, rank, slap)
                if rank == 0:
                    rotate_checkpoints(run_dir, cfg.train.keep_last)
            if signalled and step < total:  # interrupted: the step checkpoint above is the resume point
                log(f"finelap train: stopped at step {step} ({stop_reason}); resume with --resume {run_dir}")
                dist.barrier()
                return run_dir / checkpoint_name(step)
            if out_of_time:  # the budget is the run's length: finish as if max_steps were reached
                break
    final = _save(run_dir / "final", model, ema, opt, sched, cfg, step, clusters, rank, slap)
    if rank == 0:
        _calibrate_final(final, val_clips, cfg, str(device))
        if val_clips:
            metrics = _validate_with(model, ema, val_clips, cfg)
            writer.write({"step": step, **metrics})
            log(f"final validation (step {step}): " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if skipped:
            uniq = sorted(set(skipped))
            log(f"finelap train: skipped {len(skipped)} unreadable clip loads ({len(uniq)} files), e.g. {uniq[:3]}")
            (run_dir / "skipped_files.txt").write_text("\n".join(uniq) + "\n")
        _plot_curves(log_path, run_dir / "training_curves.png")
        if model.feature_cache is not None:
            st = model.feature_cache.stats()
            log(f"finelap train: feature cache: {st['hits']} hits ({st['disk_hits']} from disk), {st['misses']} computed")
        log(f"finelap train: stopped at step {step} ({stop_reason}); checkpoint: {final}")
    dist.barrier()
    return final


def _calibrate_final(final: Path, val_clips: Sequence[Clip], cfg: RunConfig, device: str = "cpu") -> None:
    """Choose detection settings on the validation clips with strong labels and store them in the
    final checkpoint (`finelap calibrate`), so detect/ground/eval use them by default; the run's
    config gets them too, so the final validation reports what `finelap eval` will. A failure
    here never loses the finished run."""
    if not cfg.eval.calibrate_after_training or not any(c.events for c in val_clips):
        return
    from ..calibration import calibrate_checkpoint

    try:
        _, rec = calibrate_checkpoint(final, ",".join(cfg.data.val), clips=val_clips, device=device)
    except Exception as e:  # noqa: BLE001 (a finished run must survive any calibration problem)
        log(f"finelap train: calibration skipped ({type(e).__name__}: {e}); run `finelap calibrate --checkpoint {final} --data VAL`")
        return
    cfg.eval.calibration = rec
    log(f"finelap train: calibrated {final}: threshold {rec['threshold']:.3g} ({len(rec['class_thresholds'])} per-class), "
        f"median filter {rec['median_filter_s']:g} s, min duration {rec['min_duration_s']:g} s, merge gap {rec['merge_gap_s']:g} s "
        f"(micro event F1 {rec['score']:.3f} on {rec['n_files']} validation files)")


def _validate_with(model, ema, val_clips, cfg) -> dict[str, float]:
    if ema is None:
        return validate(model, val_clips, cfg)
    backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ema)
    try:
        return validate(model, val_clips, cfg)
    finally:
        model.load_state_dict(backup)


def _frozen_text(model) -> bool:
    return bool(getattr(model.text, "frozen", False)) and hasattr(model.text, "cache_state")


def _trainer_state(model, slap) -> dict | None:
    """SLAP's teacher and the frozen text tower's embedding cache (needed for a bitwise resume)."""
    state = {}
    if slap is not None:
        state["slap"] = slap.state_dict()
    if _frozen_text(model):
        state["text_cache"] = model.text.cache_state()
    return state or None


def _save(path, model, ema, opt, sched, cfg, step, clusters, rank, slap=None) -> Path:
    if rank == 0:
        extra = {"phrase_clusters": clusters.to_json()} if clusters is not None else None
        save_checkpoint(
            path, checkpoint_state(model), cfg, step=step, optimizer=opt, scheduler=sched,
            ema_state=checkpoint_state(model, ema) if ema is not None else None,
            preprocessing={"frame_rate_hz": model.frame_rate_hz, "sample_rate": model.sample_rate,
                           "prompt_template": cfg.eval.prompt_template,
                           # pretrained towers name their weights' source and licence (e.g. aisfx: CC-BY-4.0)
                           **({"audio_weights": dict(model.audio.source)} if getattr(model.audio, "source", None) else {})},
            extra_json=extra, trainer_state=_trainer_state(model, slap),
        )  # fmt: skip
    dist.barrier()
    return path


class _MetricsLog:
    """Append-only CSV of training rows; on resume, rows after the resume step are dropped so the
    log matches the weights."""

    def __init__(self, path: Path, start_step: int, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.rows: list[dict] = []
        if enabled and path.exists():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r.get("step") or 0)) <= start_step]
        if enabled:
            self._flush()

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append({k: ("" if v is None else v) for k, v in row.items()})
        self._flush()

    def _flush(self) -> None:
        from ..utils import atomic_path

        keys: list[str] = []
        for r in self.rows:
            keys.extend(k for k in r if k not in keys)
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys or ["step"])
                w.writeheader()
                w.writerows(self.rows)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _progress(total: int, start: int, enabled: bool):
    import sys

    if not enabled or not sys.stderr.isatty():
        return lambda step, loss: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                    TimeRemainingColumn(), console=Console(stderr=True))  # fmt: skip
    prog.start()
    task = prog.add_task("train", total=total, completed=start, loss=float("nan"))

    def update(step: int, loss: float) -> None:
        prog.update(task, completed=step, loss=loss)
        if step >= total:
            prog.stop()

    return update


def _plot_curves(csv_path: Path, png: Path) -> None:
    try:
        from ..eval.plots import plot_training_curves
    except ImportError:
        return
    try:
        plot_training_curves(csv_path, png)
    except Exception as e:  # a plot never fails a finished run
        log(f"finelap train: could not draw training curves ({e})")


__all__ = ["train", "forward_backward", "validate", "lr_lambda", "ema_update", "step_texts", "StepTexts", "cluster_activity", "losses_from_reps"]
