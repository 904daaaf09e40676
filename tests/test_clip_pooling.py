"""Clip pooling "meanmax", the clip head's input norm and the identity text projection."""
from __future__ import annotations

import pytest
import torch

from finelap.errors import ConfigError
from finelap.models.heads import ClipHead, TextHead, masked_max, masked_mean


def test_masked_max_by_hand():
    x = torch.tensor([[[1.0, -5.0], [3.0, -1.0], [9.0, 9.0]]])  # (1, 3, 2)
    m = torch.tensor([[True, True, False]])  # the 9s are padding
    assert masked_max(x, m).tolist() == [[3.0, -1.0]]
    assert masked_max(x, None).tolist() == [[9.0, 9.0]]
    assert masked_max(x, torch.zeros(1, 3, dtype=torch.bool)).tolist() == [[0.0, 0.0]]  # empty row -> 0, not -inf


def test_meanmax_pooling_concatenates_mean_and_max():
    torch.manual_seed(0)
    head = ClipHead(4, 3, pooling="meanmax")
    x = torch.randn(2, 5, 4)
    m = torch.tensor([[True] * 5, [True, True, False, False, False]])
    pooled = head.pool(x, m)
    assert pooled.shape == (2, 8)
    torch.testing.assert_close(pooled[:, :4], masked_mean(x, m))
    torch.testing.assert_close(pooled[1, 4:], x[1, :2].amax(0))
    # a one-frame clip: its pooled embedding equals the per-frame projection of that frame
    one = torch.randn(1, 1, 4)
    torch.testing.assert_close(head(one), head.project(one)[:, 0])


def test_input_norm_makes_the_head_scale_invariant():
    torch.manual_seed(0)
    head = ClipHead(4, 3, pooling="mean", input_norm=True)
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(head(x), head(x * 7.0 + 0.0), atol=1e-5, rtol=1e-5)
    plain = ClipHead(4, 3, pooling="mean")
    assert not torch.allclose(plain(x), plain(x * 7.0), atol=1e-3)


def test_identity_text_projection():
    x = torch.randn(3, 6)
    head = TextHead(6, 6, identity=True)
    torch.testing.assert_close(head(x), torch.nn.functional.normalize(x, dim=-1))
    assert not list(head.parameters())
    with pytest.raises(ConfigError, match="embed_dim"):
        TextHead(6, 4, identity=True)
