"""noise.neftune against the closed-form statistics of Algorithm 1."""
import math

import pytest
import torch

from noise import neftune


def _noise(embeds, mask, alpha, **kw):
    return neftune(embeds, mask, alpha, **kw) - embeds


def test_uniform_norm_is_alpha_over_sqrt3_per_sequence():
    # rows of very different real lengths in one padded batch: each row's noise norm must be
    # alpha/sqrt(3) (E[eps^2] = 1/3), also the short rows (the padded-length bug would shrink them)
    alpha, d, T = 5.0, 4096, 64
    lengths = [64, 40, 7, 1]
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    g = torch.Generator().manual_seed(0)
    n = _noise(torch.zeros(len(lengths), T, d), mask, alpha, generator=g)
    norms = n.flatten(1).norm(dim=1)
    expected = alpha / math.sqrt(3)
    assert torch.allclose(norms, torch.full_like(norms, expected), rtol=0.02), norms


def test_gaussian_norm_is_alpha():
    alpha, d, T = 10.0, 4096, 50
    mask = torch.arange(T)[None] < torch.tensor([50, 13])[:, None]
    n = _noise(torch.zeros(2, T, d), mask, alpha, kind="gaussian", generator=torch.Generator().manual_seed(1))
    norms = n.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, alpha), rtol=0.02), norms


def test_uniform_bound_mean_and_zero_padding():
    alpha, d, T = 15.0, 256, 32
    lengths = torch.tensor([32, 9, 20])
    mask = torch.arange(T)[None] < lengths[:, None]
    n = _noise(torch.zeros(3, T, d), mask, alpha, generator=torch.Generator().manual_seed(2))
    bound = alpha / torch.sqrt(lengths.double() * d)  # |eps| <= 1 scaled by alpha/sqrt(L d)
    for b in range(3):
        row = n[b, : lengths[b]]
        assert row.abs().max() <= bound[b] + 1e-7
        assert row.abs().max() > 0.9 * bound[b]  # the full range is used, not a smaller one
        # mean of Uniform(-1,1) is 0; its standard error over L*d draws is 1/sqrt(3 L d)
        assert abs(row.mean() / bound[b]) < 5 / math.sqrt(3 * lengths[b] * d)
    assert torch.equal(n[~mask], torch.zeros_like(n[~mask]))


def test_padded_length_bug_is_not_reproduced():
    # a row with L real tokens gets the same per-element scale whatever the padded length T
    d, alpha = 64, 5.0
    short = torch.ones(1, 10, dtype=torch.bool)
    padded = torch.arange(100)[None] < 10
    a = _noise(torch.zeros(1, 10, d), short, alpha, generator=torch.Generator().manual_seed(3))
    b = _noise(torch.zeros(1, 100, d), padded, alpha, generator=torch.Generator().manual_seed(3))
    assert a.abs().max() <= alpha / math.sqrt(10 * d) and b.abs().max() > alpha / math.sqrt(100 * d)
    assert math.isclose(a.norm().item() / b.norm().item(), 1.0, rel_tol=0.1)


def test_packed_documents_get_their_own_length():
    # segment ids [1]*12 + [2]*5 + [3]*3 + padding: each document scaled by its own L, exactly what
    # it would get alone (same eps, since eps is drawn for the whole (B, T, d) block either way)
    d, alpha, T = 32, 5.0, 24
    seg = torch.tensor([[1] * 12 + [2] * 5 + [3] * 3 + [0] * 4])
    mask = seg > 0
    eps_src = torch.Generator().manual_seed(4)
    n = _noise(torch.zeros(1, T, d), mask, alpha, generator=eps_src, segment_ids=seg)
    eps = torch.rand(1, T, d, generator=torch.Generator().manual_seed(4)) * 2 - 1
    for doc, L in ((1, 12), (2, 5), (3, 3)):
        sel = seg[0] == doc
        assert torch.allclose(n[0, sel], eps[0, sel] * alpha / math.sqrt(L * d), atol=1e-7)
    assert torch.equal(n[0, ~mask[0]], torch.zeros(4, d))
    # and the unpacked result for one document, drawn with a per-row generator
    alone = _noise(torch.zeros(1, 5, d), None, alpha, generator=[torch.Generator().manual_seed(9)])
    packed = _noise(torch.zeros(1, 5, d), None, alpha, generator=[torch.Generator().manual_seed(9)],
                    segment_ids=torch.full((1, 5), 7))
    assert torch.equal(alone, packed)


def test_gradient_is_unchanged_and_dtype_kept():
    embeds = torch.randn(2, 6, 16, requires_grad=True)
    w = torch.randn(2, 6, 16)
    (neftune(embeds, None, 5.0) * w).sum().backward()
    assert torch.equal(embeds.grad, w)  # d(embeds + const)/d embeds = identity
    bf = torch.randn(2, 6, 16).bfloat16()
    out = neftune(bf, None, 5.0)
    assert out.dtype == torch.bfloat16 and not torch.equal(out, bf)


def test_alpha_zero_is_identity_and_negative_is_error():
    x = torch.randn(2, 3, 8)
    assert neftune(x, None, 0.0) is x
    with pytest.raises(ValueError, match="alpha"):
        neftune(x, None, -1.0)
    with pytest.raises(ValueError, match="kind"):
        neftune(x, None, 1.0, kind="laplace")


def test_determinism_and_per_row_generators():
    x = torch.zeros(3, 7, 16)
    a = neftune(x, None, 5.0, generator=torch.Generator().manual_seed(11))
    b = neftune(x, None, 5.0, generator=torch.Generator().manual_seed(11))
    c = neftune(x, None, 5.0, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # per-row generators: row 1's noise does not depend on which rows share its batch
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = neftune(x, None, 5.0, generator=gens([1, 2, 3]))
    other = neftune(x[:2], None, 5.0, generator=gens([7, 2]))
    assert torch.equal(batch[1], other[1]) and not torch.equal(batch[0], other[0])
