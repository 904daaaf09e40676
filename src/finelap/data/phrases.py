"""Phrase clusters and cluster-based phrase sampling (FineLAP).

Event labels from different sources name the same sound differently ("dog", "a dog barking",
"barking dog"). We embed every label and its natural variants with the text tower and cluster
them so synonyms share a cluster. Then, per training clip:
- each positive label is replaced by a random variant from its own cluster (augmentation),
- negatives are drawn only from clusters absent from the clip (no false negatives by synonymy),
- the set is padded to K phrases.
The clusters are saved with the dataset and with the checkpoint (`phrase_clusters.json`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import DataFormatError


def _normalise(s: str) -> str:
    return " ".join(s.strip().lower().replace("_", " ").split())


def agglomerative_clusters(emb: np.ndarray, threshold: float, must_link: Iterable[tuple[int, int]] = ()) -> np.ndarray:
    """Average-linkage agglomerative clustering on cosine similarity.

    emb: (P, D) embeddings (normalised here). Clusters merge while their average pairwise cosine
    similarity is >= threshold. `must_link` pairs start in the same cluster. Returns labels (P,)
    numbered 0.. in order of first appearance (deterministic). O(P^2) memory: fine for label
    vocabularies (thousands of phrases), not for captions.
    """
    p = len(emb)
    if p == 0:
        return np.zeros(0, dtype=np.int64)
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    parent = list(range(p))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in must_link:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = sorted({find(i) for i in range(p)})
    members = {r: [i for i in range(p) if find(i) == r] for r in roots}
    clusters = [members[r] for r in roots]
    # cluster-level summed similarity matrix; average linkage = sum / (|A| |B|)
    onehot = np.zeros((len(clusters), p))
    for c, m in enumerate(clusters):
        onehot[c, m] = 1.0
    total = onehot @ sim @ onehot.T
    sizes = onehot.sum(1)
    alive = np.ones(len(clusters), dtype=bool)
    while alive.sum() > 1:
        avg = total / np.outer(sizes, sizes)
        np.fill_diagonal(avg, -np.inf)
        avg[~alive] = -np.inf
        avg[:, ~alive] = -np.inf
        i, j = np.unravel_index(np.argmax(avg), avg.shape)
        if avg[i, j] < threshold:
            break
        i, j = min(i, j), max(i, j)
        clusters[i] = clusters[i] + clusters[j]
        total[i] += total[j]
        total[:, i] += total[:, j]
        sizes[i] += sizes[j]
        alive[j] = False
    labels = np.empty(p, dtype=np.int64)
    order = sorted((min(clusters[c]), c) for c in np.flatnonzero(alive))
    for new, (_, c) in enumerate(order):
        labels[clusters[c]] = new
    return labels


@dataclass
class PhraseClusters:
    """Phrases grouped into synonym clusters.

    phrases: every known phrase (normalised text).
    cluster: cluster id per phrase, aligned with `phrases`.
    """

    phrases: list[str]
    cluster: list[int]
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.phrases) != len(self.cluster):
            raise ValueError("phrases and cluster must have the same length")
        self._index = {p: i for i, p in enumerate(self.phrases)}
        self._members: dict[int, list[str]] = {}
        for p, c in zip(self.phrases, self.cluster):
            self._members.setdefault(int(c), []).append(p)
        self._cluster_ids = sorted(self._members)

    @classmethod
    def build(
        cls,
        labels: Sequence[str],
        variants: Mapping[str, Sequence[str]] | None = None,
        embed: Callable[[list[str]], np.ndarray] | None = None,
        threshold: float = 0.8,
    ) -> "PhraseClusters":
        """Cluster labels and their variants.

        labels: event labels as they appear in the data.
        variants: label -> natural phrasings (e.g. from the synth phrase bank); a label and its
            variants always share a cluster.
        embed: texts -> (N, D) embeddings (the text tower); without it only the label/variant
            groups are used (no merging across labels).
        threshold: average cosine similarity needed to merge clusters.
        """
        variants = variants or {}
        phrases: list[str] = []
        index: dict[str, int] = {}
        links: list[tuple[int, int]] = []

        def add(p: str) -> int:
            p = _normalise(p)
            if p not in index:
                index[p] = len(phrases)
                phrases.append(p)
            return index[p]

        for lab in labels:
            a = add(lab)
            for v in variants.get(lab, ()):
                links.append((a, add(v)))
        if embed is not None and phrases:
            emb = np.asarray(embed(list(phrases)), dtype=np.float64)
            ids = agglomerative_clusters(emb, threshold, links)
        else:
            ids = agglomerative_clusters(np.eye(len(phrases)), 2.0, links)  # links only
        return cls(phrases, [int(i) for i in ids])

    def __len__(self) -> int:
        return len(self.phrases)

    @property
    def num_clusters(self) -> int:
        return len(self._cluster_ids)

    def cluster_of(self, phrase: str) -> int | None:
        i = self._index.get(_normalise(phrase))
        return None if i is None else self.cluster[i]

    def members(self, cluster_id: int) -> list[str]:
        return list(self._members[cluster_id])

    def sample_phrase_set(
        self,
        positives: Sequence[str],
        k: int,
        rng: np.random.Generator,
        replace_with_variant: bool = True,
    ) -> tuple[list[str], list[int]]:
        """Phrase set for one clip: its positives (one phrase per distinct cluster) followed by
        negatives from clusters absent from the clip, padded to exactly `k` when enough clusters
        exist (otherwise fewer; the caller masks).

        Returns (phrases, cluster ids). Unknown positive labels are kept as-is with a fresh
        pseudo-cluster id (negative numbers) so they are never sampled as negatives.
        """
        out: list[str] = []
        cids: list[int] = []
        seen: set[int] = set()
        unknown = -1
        for lab in positives:
            c = self.cluster_of(lab)
            if c is None:
                if _normalise(lab) in (_normalise(p) for p in out):
                    continue
                out.append(_normalise(lab))
                cids.append(unknown)
                unknown -= 1
                continue
            if c in seen:
                continue
            seen.add(c)
            mem = self._members[c]
            out.append(mem[int(rng.integers(len(mem)))] if replace_with_variant else _normalise(lab))
            cids.append(c)
        if len(out) > k:  # more distinct positives than slots: keep a random subset
            keep = np.sort(rng.choice(len(out), size=k, replace=False))
            return [out[i] for i in keep], [cids[i] for i in keep]
        free = [c for c in self._cluster_ids if c not in seen]
        n_neg = min(k - len(out), len(free))
        if n_neg > 0:
            for c in rng.choice(free, size=n_neg, replace=False):
                mem = self._members[int(c)]
                out.append(mem[int(rng.integers(len(mem)))])
                cids.append(int(c))
        return out, cids

    def to_json(self) -> dict:
        return {"format": "finelap.phrase_clusters", "version": 1, "phrases": self.phrases, "cluster": self.cluster}

    @classmethod
    def from_json(cls, obj: dict, source: str = "<dict>") -> "PhraseClusters":
        if obj.get("format") != "finelap.phrase_clusters":
            raise DataFormatError(source, "not a finelap phrase-cluster file (missing format tag)")
        return cls(list(obj["phrases"]), [int(c) for c in obj["cluster"]])

    def save(self, path: str | Path) -> None:
        from ..utils import write_json_atomic

        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "PhraseClusters":
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"invalid JSON ({e.msg})", e.lineno) from None
        return cls.from_json(obj, str(path))
