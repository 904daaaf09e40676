"""A small caption decoder (SLAP's captioning objective): a causal transformer that reads the audio
encoder's frames through cross-attention and predicts caption tokens.

It reuses the text tower's tokenizer, so no new vocabulary file is needed: ``[CLS]`` (or the
tokenizer's BOS) starts a caption, ``[SEP]`` (or its EOS) ends it and ``[PAD]`` fills the rest.

    dec = CaptionDecoder(dim_audio=256, vocab_size=len(tok), **special_token_ids_dict(tok))
    inputs, targets = prepare_targets(tok, captions, dec.max_len)      # (B, L), (B, L)
    logits = dec(frames, frame_mask, inputs)                           # (B, L, V): teacher forcing
    ids = dec.generate(frames, frame_mask, max_len=30, beam_size=3)    # list of token-id lists

A model builds its decoder from `ModelConfig.caption_decoder`. The architecture is also stored in
the ``arch`` buffer, so a state dict alone can rebuild the module (`CaptionDecoder.from_state_dict`)
and loading a checkpoint checks the stored decoder against its config.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["CaptionDecoder", "prepare_targets", "special_token_ids", "sinusoidal_positions"]


def special_token_ids(tokenizer: Any) -> tuple[int, int, int]:
    """(bos, eos, pad) ids of a Hugging Face tokenizer: [CLS]/[SEP]/[PAD] for BERT-style
    tokenizers, else its bos/eos/pad tokens. ConfigError when one is missing or pad collides."""
    bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if bos is None or eos is None or pad is None:
        raise ConfigError(
            f"the text tokenizer ({type(tokenizer).__name__}) lacks a start ([CLS]/bos), end ([SEP]/eos) or "
            f"[PAD] token (got bos={bos}, eos={eos}, pad={pad}); the caption decoder needs all three"
        )
    if pad in (bos, eos) or bos == eos:
        raise ConfigError(f"the text tokenizer's start/end/pad tokens must differ (bos={bos}, eos={eos}, pad={pad})")
    return int(bos), int(eos), int(pad)


def prepare_targets(
    tokenizer: Any,
    captions: Sequence[str],
    max_len: int,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing pairs for a batch of captions.

    Each caption becomes ``[BOS] w_1 .. w_n [EOS]`` with n <= max_len - 1 word pieces (longer ones
    are truncated, keeping the EOS); inputs are that sequence without its last token and targets
    without its first (shifted by one). Rows are padded with pad_id to L = the longest row
    (1 <= L <= max_len). An empty caption ("": the clip has no caption) gives an all-pad row,
    which the loss ignores. Returns (inputs (B, L) int64, targets (B, L) int64).
    """
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, not a single string")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (a word and the end token), got {max_len}")
    if bos_id is None or eos_id is None or pad_id is None:
        b, e, p = special_token_ids(tokenizer)
        bos_id, eos_id, pad_id = (b if bos_id is None else bos_id), (e if eos_id is None else eos_id), (p if pad_id is None else pad_id)
    texts = [c.strip() if isinstance(c, str) else "" for c in captions]
    if any(texts):
        ids = tokenizer([t for t in texts], add_special_tokens=False, truncation=True, max_length=max_len - 1)["input_ids"]
    else:
        ids = [[] for _ in texts]
    rows = [[bos_id, *w, eos_id] if t and w else [] for t, w in zip(texts, ids)]
    length = max([len(r) - 1 for r in rows] + [1])
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            inputs[i, : len(r) - 1] = torch.tensor(r[:-1])
            targets[i, : len(r) - 1] = torch.tensor(r[1:])
    return inputs, targets


def sinusoidal_positions(n: int, dim: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, dim) fixed sine/cosine positions (Vaswani et al.); defined for any n, so audio of any
    length gets positions the decoder has seen the pattern of."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / max(1, half))
    ang = pos * freq[None]
    out = torch.zeros(n, dim, device=device, dtype=torch.float32)
    out[:, 0 : 2 * half : 2] = torch.sin(ang)
    out[:, 1 : 2 * half : 2] = torch.cos(ang)
    return out.to(dtype)


class CaptionDecoder(nn.Module):
    """Transformer caption decoder with cross-attention to audio frames.

    Tokens: learned token + position embeddings (positions < max_len), `layers` pre-norm decoder
    layers (causal self-attention, cross-attention to the frames, GELU MLP), final LayerNorm, and
    an output projection tied to the token embedding (plus a bias): vocabulary-sized models stay
    small. Memory: frames (B, T, dim_audio) -> Linear -> LayerNorm, plus sinusoidal positions so
    the decoder knows where in the clip a frame is; padded frames are hidden from cross-attention.
    """

    def __init__(
        self,
        dim_audio: int,
        vocab_size: int,
        dim: int = 256,
        layers: int = 2,
        heads: int = 4,
        max_len: int = 32,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"caption decoder dim ({dim}) must be divisible by heads ({heads})")
        if max_len < 2 or layers < 1 or vocab_size < 3 or dim_audio < 1:
            raise ConfigError(f"caption decoder: bad sizes (dim_audio={dim_audio}, vocab={vocab_size}, layers={layers}, max_len={max_len})")
        for name, v in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if not 0 <= v < vocab_size:
                raise ConfigError(f"caption decoder: {name}={v} outside the vocabulary (size {vocab_size})")
        self.dim_audio, self.vocab_size, self.dim, self.layers, self.heads, self.max_len = dim_audio, vocab_size, dim, layers, heads, max_len
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        # the architecture travels with the weights (see from_state_dict)
        self.register_buffer("arch", torch.tensor([dim_audio, vocab_size, dim, layers, heads, max_len, bos_id, eos_id, pad_id]))
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(max_len, dim)
        self.memory_proj = nn.Linear(dim_audio, dim)
        self.memory_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(
            nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.out_bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed.weight, std=0.02)

    ARCH_FIELDS = ("dim_audio", "vocab_size", "dim", "layers", "heads", "max_len", "bos_id", "eos_id", "pad_id")

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], prefix: str = "") -> "CaptionDecoder":
        """An (untrained) decoder with the architecture recorded in ``state[prefix + "arch"]``."""
        key = prefix + "arch"
        if key not in state:
            raise KeyError(f"no caption decoder architecture ({key}) in the state dict")
        vals = [int(v) for v in state[key].tolist()]
        if len(vals) != len(cls.ARCH_FIELDS):
            raise ConfigError(f"{key}: expected {len(cls.ARCH_FIELDS)} values, got {len(vals)}")
        kw = dict(zip(cls.ARCH_FIELDS, vals))
        return cls(kw.pop("dim_audio"), kw.pop("vocab_size"), **kw)

    # ------------------------------------------------------------------ pieces
    def encode_memory(self, memory: torch.Tensor, memory_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (B, T, Da), mask (B, T) bool (None: all valid) -> (memory (B, T, dim), key padding mask (B, T), True = ignore)."""
        if memory.dim() != 3 or memory.shape[-1] != self.dim_audio:
            raise ValueError(f"memory must be (B, T, {self.dim_audio}), got {tuple(memory.shape)}")
        b, t, _ = memory.shape
        if memory_mask is None:
            memory_mask = torch.ones(b, t, dtype=torch.bool, device=memory.device)
        if memory_mask.shape != (b, t):
            raise ValueError(f"memory_mask must be (B, T)={(b, t)}, got {tuple(memory_mask.shape)}")
        memory_mask = memory_mask.to(device=memory.device, dtype=torch.bool)
        x = self.memory_norm(self.memory_proj(memory))
        x = x + sinusoidal_positions(t, self.dim, x.device, x.dtype)[None]
        # a clip with no valid frame would make attention softmax over nothing (NaN): let it see its (zero) frames
        empty = ~memory_mask.any(1, keepdim=True)
        return x, ~(memory_mask | empty)

    def decode(self, tokens: torch.Tensor, mem: torch.Tensor, key_padding: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """tokens (B, L) with L <= max_len, encoded memory -> logits (B, L, V), or (B, 1, V) for
        the last position only with `last_only` (generation: the vocabulary projection dominates)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, L), got {tuple(tokens.shape)}")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"{length} tokens exceed the decoder's max_len={self.max_len}")
        if tokens.shape[0] != mem.shape[0]:
            raise ValueError(f"{tokens.shape[0]} token rows for {mem.shape[0]} memories")
        pos = torch.arange(length, device=tokens.device)
        x = self.token_embed(tokens) + self.pos_embed(pos)[None]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=tokens.device), 1)  # True = may not attend
        for blk in self.blocks:
            x = blk(x, mem, tgt_mask=causal, memory_key_padding_mask=key_padding, tgt_is_causal=True)
        if last_only:
            x = x[:, -1:]
        return F.linear(self.norm(x), self.token_embed.weight, self.out_bias)

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: frames (B, T, Da), mask (B, T) bool, input tokens (B, L) -> logits (B, L, V);
        logits[:, i] predict token i + 1 of the caption (the targets of `prepare_targets`)."""
        mem, kp = self.encode_memory(memory, memory_mask)
        return self.decode(tokens.to(mem.device), mem, kp)

    # ------------------------------------------------------------------ incremental decoding
    # Generation feeds one token per step. Recomputing the whole prefix through
    # nn.TransformerDecoderLayer would project the memory to keys/values again at every step and
    # for every beam ((beams, T, dim) per layer): for a 30-min file (45,000 frames) that is
    # minutes and ~1 GB. Here the memory's keys/values are projected once, beams share them, and
    # self-attention keeps the (normed) inputs of earlier positions, which causal attention never
    # changes. Same arithmetic as `decode` (tested), one position at a time.

    def _start(self, mem: torch.Tensor, key_padding: torch.Tensor) -> dict[str, Any]:
        """Per-layer cross-attention keys/values (Bm, heads, T, hd) of the encoded memory, an
        additive mask (Bm, 1, 1, T) and empty self-attention caches."""
        bm, t, _ = mem.shape
        hd = self.dim // self.heads
        cross = []
        for blk in self.blocks:
            mha = blk.multihead_attn
            _, wk, wv = mha.in_proj_weight.chunk(3)
            _, bk, bv = mha.in_proj_bias.chunk(3)
            k = F.linear(mem, wk, bk).view(bm, t, self.heads, hd).transpose(1, 2)
            v = F.linear(mem, wv, bv).view(bm, t, self.heads, hd).transpose(1, 2)
            cross.append((k, v))
        bias = torch.zeros(bm, 1, 1, t, dtype=mem.dtype, device=mem.device).masked_fill(key_padding[:, None, None, :], -math.inf)
        return {"cross": cross, "bias": bias, "self": [None] * len(self.blocks)}

    def _cross_attend(self, blk: nn.TransformerDecoderLayer, y: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Cross-attention of queries y (n, 1, dim) to cached keys/values. With one memory row
        and several beams, the beams are laid along the query axis (1, heads, n, hd), so the
        memory's keys/values are never copied per beam."""
        mha = blk.multihead_attn
        n = y.shape[0]
        hd = self.dim // self.heads
        wq, _, _ = mha.in_proj_weight.chunk(3)
        bq, _, _ = mha.in_proj_bias.chunk(3)
        q = F.linear(y, wq, bq).view(n, 1, self.heads, hd).transpose(1, 2)  # (n, heads, 1, hd)
        fold = k.shape[0] == 1 and n > 1
        if fold:
            q = q.transpose(0, 2)  # (1, heads, n, hd)
        att = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd) + bias, dim=-1)
        o = torch.matmul(att, v)
        if fold:
            o = o.transpose(0, 2)
        return mha.out_proj(o.transpose(1, 2).reshape(n, 1, self.dim))

    def _step(self, tokens: torch.Tensor, pos: int, state: dict[str, Any]) -> torch.Tensor:
        """Feed tokens (n,) at position `pos` (0: BOS); returns logits (n, V) for the next token.
        state["self"] grows by one position per call; reorder it with `_reorder` between calls."""
        x = self.token_embed(tokens)[:, None] + self.pos_embed.weight[pos][None, None]  # (n, 1, dim)
        for i, blk in enumerate(self.blocks):
            # pre-norm TransformerDecoderLayer (norm_first=True), see `decode`
            y = blk.norm1(x)
            past = y if state["self"][i] is None else torch.cat([state["self"][i], y], 1)
            state["self"][i] = past
            x = x + blk.dropout1(blk.self_attn(y, past, past, need_weights=False)[0])
            k, v = state["cross"][i]
            x = x + blk.dropout2(self._cross_attend(blk, blk.norm2(x), k, v, state["bias"]))
            x = x + blk.dropout3(blk.linear2(blk.dropout(blk.activation(blk.linear1(blk.norm3(x))))))
        return F.linear(self.norm(x[:, 0]), self.token_embed.weight, self.out_bias)

    def _next_logits(self, prefix: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Logits (n, V) of the token after each prefix (n, L). Generation calls it with prefixes
        one token longer each time; `state` (from `_start`) already holds the earlier positions."""
        return self._step(prefix[:, -1], prefix.shape[1] - 1, state)

    @staticmethod
    def _reorder(state: dict[str, Any], rows: torch.Tensor) -> None:
        state["self"] = [None if c is None else c.index_select(0, rows) for c in state["self"]]

    # ------------------------------------------------------------------ inference
    def _banned(self, logp: torch.Tensor, step: int, min_len: int) -> torch.Tensor:
        """Never emit pad or BOS; no EOS before `min_len` tokens."""
        logp = logp.clone()
        logp[..., self.pad_id] = -math.inf
        logp[..., self.bos_id] = -math.inf
        if step < min_len:
            logp[..., self.eos_id] = -math.inf
        return logp

    @torch.no_grad()
    def generate(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        max_len: int = 30,
        beam_size: int = 1,
        min_len: int = 1,
    ) -> list[list[int]]:
        """Decode one caption per clip: frames (B, T, Da), mask (B, T) -> B lists of token ids
        (without BOS/EOS/pad). beam_size=1 is greedy; > 1 is beam search ranked by the
        length-normalised log-probability (sum of token log-probs / number of tokens, EOS
        included). At most max_len tokens (<= the decoder's max_len) and at least min_len before
        EOS. Deterministic: runs in eval mode (the mode is restored afterwards)."""
        if not 1 <= max_len <= self.max_len:
            raise ValueError(f"max_len must be in [1, {self.max_len}] (the decoder's max_len), got {max_len}")
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        was = self.training
        self.eval()
        try:
            mem, kp = self.encode_memory(memory, memory_mask)
            if beam_size == 1:
                return self._greedy(mem, kp, max_len, min_len)
            return [self._beam(mem[i : i + 1], kp[i : i + 1], max_len, beam_size, min_len) for i in range(mem.shape[0])]
        finally:
            self.train(was)

    def _greedy(self, mem: torch.Tensor, kp: torch.Tensor, max_len: int, min_len: int) -> list[list[int]]:
        b = mem.shape[0]
        tokens = torch.full((b, 1), self.bos_id, dtype=torch.long, device=mem.device)
        done = torch.zeros(b, dtype=torch.bool, device=mem.device)
        state = self._start(mem, kp)
        for step in range(max_len):
            logp = self._banned(F.log_softmax(self._next_logits(tokens, state).float(), -1), step, min_len)
            nxt = logp.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            done |= nxt == self.eos_id
            if bool(done.all()):
                break
        out = []
        for row in tokens[:, 1:].tolist():
            out.append(row[: row.index(self.eos_id)] if self.eos_id in row else [t for t in row if t != self.pad_id])
        return out

    def _beam(self, mem: torch.Tensor, kp: torch.Tensor, max_len: int, k: int, min_len: int) -> list[int]:
        """Beam search for one clip (mem (1, T, dim))."""
        alive = torch.full((1, 1), self.bos_id, dtype=torch.long, device=mem.device)
        scores = torch.zeros(1, device=mem.device)
        finished: list[tuple[float, list[int]]] = []
        state = self._start(mem, kp)  # one memory row, shared by every beam
        for step in range(max_len):
            logp = F.log_softmax(self._next_logits(alive, state).float(), -1)
            cand = (scores[:, None] + self._banned(logp, step, min_len)).reshape(-1)
            top = cand.topk(min(2 * k, cand.numel()))
            keep_rows, keep_tok, keep_scores = [], [], []
            for rank, (s, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                if s == -math.inf:
                    break
                row, tok = divmod(idx, self.vocab_size)
                if tok == self.eos_id:
                    if rank < k:  # an ended hypothesis that would have been inside the beam
                        words = alive[row, 1:].tolist()
                        finished.append((s / (len(words) + 1), words))
                    continue
                keep_rows.append(row)
                keep_tok.append(tok)
                keep_scores.append(s)
                if len(keep_rows) == k:
                    break
            if len(finished) >= k or not keep_rows:
                break
            rows = torch.tensor(keep_rows, device=mem.device)
            self._reorder(state, rows)
            alive = torch.cat([alive[rows], torch.tensor(keep_tok, device=mem.device)[:, None]], 1)
            scores = torch.tensor(keep_scores, device=mem.device)
        else:  # max_len reached: unterminated hypotheses compete too
            for words, s in zip(alive[:, 1:].tolist(), scores.tolist()):
                finished.append((s / max(1, len(words)), words))
        if not finished:  # every continuation was banned (cannot happen with a vocabulary > 3)
            return []
        best = max(range(len(finished)), key=lambda i: (finished[i][0], -i))  # ties: the earliest found
        return finished[best][1]
