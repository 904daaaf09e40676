from __future__ import annotations

import json

import numpy as np
import pytest

from finelap.data.phrases import PhraseClusters, agglomerative_clusters


def _naive_average_linkage(emb: np.ndarray, threshold: float) -> list[set[int]]:
    """Reference: recompute average linkage from scratch at each merge."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x @ x.T
    clusters = [{i} for i in range(len(emb))]
    while len(clusters) > 1:
        best, pair = -np.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                v = np.mean([sim[i, j] for i in clusters[a] for j in clusters[b]])
                if v > best:
                    best, pair = v, (a, b)
        if best < threshold:
            break
        a, b = pair
        clusters[a] |= clusters.pop(b)
    return clusters


def test_agglomerative_hand_case():
    emb = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.1, 0.99]], float)
    labels = agglomerative_clusters(emb, threshold=0.9)
    assert labels.tolist() == [0, 0, 1, 1]
    assert agglomerative_clusters(emb, threshold=0.999).tolist() == [0, 1, 2, 3]
    # must-link overrides similarity
    assert agglomerative_clusters(emb, threshold=0.999, must_link=[(0, 2)]).tolist() == [0, 1, 0, 2]


@pytest.mark.parametrize("seed", range(5))
def test_agglomerative_matches_naive_reference(seed):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((4, 8))
    emb = np.concatenate([c + 0.3 * rng.standard_normal((3, 8)) for c in centers])
    ours = agglomerative_clusters(emb, threshold=0.6)
    ref = _naive_average_linkage(emb, 0.6)
    ours_sets = sorted(sorted(np.flatnonzero(ours == c).tolist()) for c in set(ours.tolist()))
    assert ours_sets == sorted(sorted(c) for c in ref)


def _toy_embed(texts):
    """Deterministic bag-of-words embedding: synonyms share words."""
    vocab = ["dog", "bark", "car", "horn", "rain", "piano"]
    out = np.zeros((len(texts), len(vocab)))
    for i, t in enumerate(texts):
        for j, w in enumerate(vocab):
            out[i, j] = float(w in t)
    return out + 1e-3


def test_synonyms_share_cluster_and_negatives_avoid_it():
    pc = PhraseClusters.build(
        ["dog", "dog barking", "car_horn", "rain", "piano"],
        variants={"dog": ["a dog barking", "barking dog"], "car_horn": ["a car horn honking"]},
        embed=_toy_embed,
        threshold=0.7,
    )
    assert pc.cluster_of("dog") == pc.cluster_of("dog barking") == pc.cluster_of("barking dog")
    assert pc.cluster_of("car horn") != pc.cluster_of("dog")
    assert pc.num_clusters == 4
    rng = np.random.default_rng(0)
    for _ in range(50):
        phrases, cids = pc.sample_phrase_set(["dog barking"], k=3, rng=rng)
        assert len(phrases) == 3
        assert pc.cluster_of(phrases[0]) == pc.cluster_of("dog")  # positive replaced by a variant of its own cluster
        assert all(c != pc.cluster_of("dog") for c in cids[1:])  # no negative from a present cluster
        assert len(set(cids)) == 3


def test_phrase_set_padding_and_unknown_labels():
    pc = PhraseClusters.build(["a", "b", "c"])
    rng = np.random.default_rng(1)
    phrases, cids = pc.sample_phrase_set(["a", "zebra"], k=10, rng=rng)
    assert phrases[:2] == ["a", "zebra"] and cids[1] < 0
    assert sorted(phrases[2:]) == ["b", "c"]  # only 2 clusters left: set is shorter than k
    phrases, _ = pc.sample_phrase_set(["a", "b", "c"], k=2, rng=rng)
    assert len(phrases) == 2


def test_roundtrip_json(tmp_path):
    pc = PhraseClusters.build(["dog", "cat"], variants={"dog": ["a dog"]})
    pc.save(tmp_path / "pc.json")
    back = PhraseClusters.load(tmp_path / "pc.json")
    assert back.phrases == pc.phrases and back.cluster == pc.cluster
    (tmp_path / "bad.json").write_text(json.dumps({"phrases": []}))
    with pytest.raises(Exception, match="bad.json"):
        PhraseClusters.load(tmp_path / "bad.json")
