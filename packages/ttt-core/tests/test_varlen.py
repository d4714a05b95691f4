"""Variable-length batches: packed sequences (cu_seqlens) and right padding (lengths) equal separate
calls per sequence, outputs, final states and every gradient (fp64); padding changes nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import call, make_inputs

SEQS = [5, 1, 7, 3]  # lengths: not multiples of b = 3, one of length 1


def _slice(d, s, e, sample=0):
    return {n: t[sample : sample + 1, :, s:e] for n, t in d.items()}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("mode", ["causal", "noncausal", "titans"])
def test_packed_equals_separate_calls_fp64(kind, mode):
    causal, titans = mode != "noncausal", mode == "titans"
    x, w, ln, extra = make_inputs(kind, B=1, H=2, L=sum(SEQS), D=5, titans=titans,
                                  requires_grad=True)  # fmt: skip
    leaves = [*x.values(), *w.values(), *ln.values(), *extra.values()]
    cu = torch.tensor([0, *torch.tensor(SEQS).cumsum(0).tolist()])
    kw = dict(mini_batch_size=3, causal=causal, output_final_state=causal)
    o, finals = call(kind, x, w, ln, extra, cu_seqlens=cu, **kw)
    parts, refs = [], []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        oi, st = call(kind, _slice(x, s, e), w, ln, _slice(extra, s, e), **kw)
        parts.append(oi)
        refs.append(st)
    ref = torch.cat(parts, dim=2)
    torch.testing.assert_close(o, ref, rtol=1e-12, atol=1e-12)
    if causal:
        assert [f.offset for f in finals] == [n % 3 for n in SEQS]
        for got, want in zip(finals, refs):
            for a, b in zip(got.tensors(), want.tensors()):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    weight = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
    g = torch.autograd.grad((o * weight).sum(), leaves)
    g_ref = torch.autograd.grad((ref * weight).sum(), leaves)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_packed_sequences_continue_from_their_own_states():
    """Per-sequence initial states: a packed call continued by a second packed call equals each
    sequence run in one call."""
    x, w, ln, _ = make_inputs("linear", B=1, H=2, L=12, D=5)
    _, mid = call("linear", _slice(x, 0, 6), w, ln, cu_seqlens=[0, 4, 6], mini_batch_size=3,
                  output_final_state=True)  # fmt: skip
    assert [s.offset for s in mid] == [1, 2]
    o2, _ = call("linear", _slice(x, 6, 12), w, ln, cu_seqlens=[0, 2, 6], initial_state=mid,
                 mini_batch_size=3)  # fmt: skip
    whole_a = {n: torch.cat([t[:, :, 0:4], t[:, :, 6:8]], 2) for n, t in x.items()}
    whole_b = {n: torch.cat([t[:, :, 4:6], t[:, :, 8:12]], 2) for n, t in x.items()}
    oa, _ = call("linear", whole_a, w, ln, mini_batch_size=3)
    ob, _ = call("linear", whole_b, w, ln, mini_batch_size=3)
    torch.testing.assert_close(o2[:, :, :2], oa[:, :, 4:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o2[:, :, 2:], ob[:, :, 2:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_padding_changes_nothing(causal):
    """Right padding (lengths): the real tokens' outputs and every gradient do not depend on what
    the padding holds, equal one call per sample on its real tokens, and padded outputs are 0."""
    lengths = [7, 1, 4]
    x, w, ln, _ = make_inputs("mlp", B=3, H=2, L=7, D=5, requires_grad=True)
    leaves = [*x.values(), *w.values(), *ln.values()]
    kw = dict(mini_batch_size=3, causal=causal, lengths=torch.tensor(lengths))
    o, _ = call("mlp", x, w, ln, **kw)
    pad = torch.arange(7).view(1, 7) >= torch.tensor(lengths).view(3, 1)  # (B, L)
    noisy = {n: t + 100.0 * pad.view(3, 1, 7, *[1] * (t.ndim - 3)) for n, t in x.items()}
    o_noisy, _ = call("mlp", noisy, w, ln, **kw)
    mask = torch.arange(7).view(1, 1, 7, 1) < torch.tensor(lengths).view(3, 1, 1, 1)
    torch.testing.assert_close(o * mask, o_noisy * mask, rtol=1e-12, atol=1e-12)
    assert (o[~mask.expand_as(o)] == 0).all()
    for i, n in enumerate(lengths):
        oi, _ = call("mlp", _slice(x, 0, n, i), w, ln, mini_batch_size=3, causal=causal)
        torch.testing.assert_close(o[i : i + 1, :, :n], oi, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad((o * mask).sum(), leaves)
    g_sep = torch.autograd.grad(
        sum(call("mlp", _slice(x, 0, n, i), w, ln, mini_batch_size=3, causal=causal)[0].sum()
            for i, n in enumerate(lengths)),
        leaves,
    )  # fmt: skip
    for a, b in zip(g, g_sep):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(cu_seqlens=[0, 3, 3, 9]), "must increase strictly"),
        (dict(cu_seqlens=[0, 3, 8]), "must increase strictly from 0 to the packed length T=9"),
        (dict(cu_seqlens=[0.0, 9.0]), "list of ints"),
        (dict(lengths=[3]), r"lengths must hold B=1 ints in \[1, L=9\]"),
        (dict(lengths=[0]), r"lengths must hold B=1 ints in \[1, L=9\]"),
        (dict(lengths=[9], cu_seqlens=[0, 9]), "not both"),
        (dict(lengths=torch.tensor([True])), "1-D integer tensor"),  # not lengths [1]
    ],
    ids=["empty-sequence", "wrong-total", "float", "lengths-count", "length-zero", "both", "bool"],
)
def test_bad_varlen(kw, match):
    x, w, ln, _ = make_inputs("linear", B=1, L=9)
    if "lengths" in kw and len(kw["lengths"]) == 1 and kw["lengths"][0] == 3:
        x = {n: torch.cat([t, t], 0) for n, t in x.items()}
        with pytest.raises(ValueError, match=r"lengths must hold B=2 ints"):
            call("linear", x, w, ln, **kw)
        return
    with pytest.raises((ValueError, TypeError), match=match):
        call("linear", x, w, ln, **kw)
