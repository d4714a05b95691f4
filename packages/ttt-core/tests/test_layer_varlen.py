"""TTTLayer on variable-length batches (``lengths``, ``cu_seqlens``): a padded or packed call equals
one call per sequence (outputs of real tokens, final states, every parameter gradient; fp64), and
padding values change nothing. Causal, non-causal and bidirectional layers."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from ttt_core import TTTConfig, TTTLayer

LENGTHS = [5, 1, 7]  # not multiples of b = 3, one of length 1; L = 7
C, H = 10, 2  # head dim 5

CONFIGS = {
    "causal-linear": dict(),
    "causal-mlp-gelu-gate": dict(inner="mlp", gate="gelu"),
    "titans": dict(titans=True),
    "noncausal": dict(causal=False),
    "bidirectional": dict(bidirectional=True),
}


def make_layer(name: str) -> TTTLayer:
    torch.manual_seed(0)
    options = {"gate": "tanh_alpha", "gate_init": 0.5, **CONFIGS[name]}
    cfg = TTTConfig(hidden_size=C, num_heads=H, mini_batch_size=3, base_lr=3.0, **options)
    return TTTLayer(cfg).double()


def weighted(y: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient differs per token and channel."""
    return (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()


def grads(layer: TTTLayer, loss) -> list:
    return torch.autograd.grad(loss, list(layer.parameters()), allow_unused=True)


def assert_same(got, want, tol=1e-10):
    for a, b in zip(got, want, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def separate(layer: TTTLayer, seqs: list[torch.Tensor]):
    """One layer call per sequence [1, n, C]: the outputs and final states."""
    outs, states = [], []
    for s in seqs:
        y, st = layer(s)
        outs.append(y)
        states.append(st)
    return outs, states


@pytest.mark.parametrize("name", list(CONFIGS))
def test_padded_batch_equals_separate_calls(name):
    layer = make_layer(name)
    x = torch.randn(len(LENGTHS), max(LENGTHS), C, dtype=torch.float64)
    y, states = layer(x, lengths=torch.tensor(LENGTHS))
    seqs = [x[i : i + 1, :n] for i, n in enumerate(LENGTHS)]
    refs, ref_states = separate(layer, seqs)
    for i, (n, ref) in enumerate(zip(LENGTHS, refs)):
        torch.testing.assert_close(y[i : i + 1, :n], ref, rtol=1e-10, atol=1e-10)
    if layer.config.causal and not layer.config.bidirectional:
        assert [s.offset for s in states] == [n % 3 for n in LENGTHS]
        for got, want in zip(states, ref_states):
            assert_same(got.tensors(), want.tensors())
    else:
        assert states is None
    real = [y[i : i + 1, :n] for i, n in enumerate(LENGTHS)]
    g = grads(layer, sum(weighted(r) for r in real))
    assert_same(g, grads(layer, sum(weighted(r) for r in refs)))
    assert sum(t is not None for t in g) == len(g)  # every parameter gets a gradient


@pytest.mark.parametrize("name", ["causal-linear", "noncausal", "bidirectional"])
def test_packed_equals_separate_calls(name):
    layer = make_layer(name)
    x = torch.randn(1, sum(LENGTHS), C, dtype=torch.float64)
    cu = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    y, states = layer(x, cu_seqlens=cu)
    seqs = [x[:, s:e] for s, e in pairwise(cu)]
    refs, ref_states = separate(layer, seqs)
    torch.testing.assert_close(y, torch.cat(refs, 1), rtol=1e-10, atol=1e-10)
    if name == "causal-linear":
        for got, want in zip(states, ref_states):
            assert_same(got.tensors(), want.tensors())
    assert_same(grads(layer, weighted(y)), grads(layer, weighted(torch.cat(refs, 1))))


@pytest.mark.parametrize("name", ["causal-linear", "bidirectional"])
def test_padding_values_change_nothing(name):
    """Other values in the padding leave the real tokens' outputs and every gradient unchanged."""
    layer = make_layer(name)
    x = torch.randn(len(LENGTHS), max(LENGTHS), C, dtype=torch.float64)
    x2 = x.clone()
    for i, n in enumerate(LENGTHS):
        x2[i, n:] = 1e3 * torch.randn(max(LENGTHS) - n, C, dtype=torch.float64)
    results = []
    for xi in (x, x2):
        y, _ = layer(xi, lengths=LENGTHS)
        real = [y[i, :n] for i, n in enumerate(LENGTHS)]
        results.append((real, grads(layer, sum(weighted(r) for r in real))))
    (real_a, g_a), (real_b, g_b) = results
    assert_same(real_a, real_b, tol=1e-12)
    assert_same(g_a, g_b, tol=1e-12)


def test_padded_streaming_continues_from_per_sample_states():
    """A padded chunk's per-sample states continue each sample's sequence exactly."""
    layer = make_layer("causal-linear")
    x = torch.randn(2, 9, C, dtype=torch.float64)
    _, mid = layer(x[:, :4], lengths=[4, 2])
    y2, _ = layer(x[:, 4:], lengths=[5, 5], state=mid)
    whole_a, _ = layer(x[:1])
    whole_b, _ = layer(torch.cat([x[1:, :2], x[1:, 4:]], 1))
    torch.testing.assert_close(y2[:1], whole_a[:, 4:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y2[1:], whole_b[:, 2:], rtol=1e-10, atol=1e-10)


def test_packed_layer_needs_one_row():
    layer = make_layer("causal-linear")
    with pytest.raises(ValueError, match=r"x must be \[1, T, C\]"):
        layer(torch.randn(2, 6, C, dtype=torch.float64), cu_seqlens=[0, 3, 6])
