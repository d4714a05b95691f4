"""The custom ops check the kernels' reading contract (shapes, dtypes, devices: ``check_contract``)
before any pointer reaches the C++: a mismatched argument raises naming the op and the argument
instead of reading past a tensor's end (NaN, heap corruption)."""

from __future__ import annotations

import re

import pytest
import torch

from ttt_cuda.ops import (
    linear_bwd,
    linear_fwd,
    mlp_bwd,
    mlp_fwd,
    titans_bwd,
    titans_fwd,
    titans_mlp_bwd,
    titans_mlp_fwd,
)
from ttt_cuda.ops.launch import check_contract

B, H, L, D, F, b = 2, 2, 7, 4, 8, 3  # L = 7, b = 3: three segments, the last one short


def rnd(*shape):
    return 0.1 * torch.randn(*shape)


def seq():
    return {"q": rnd(B, H, L, D), "k": rnd(B, H, L, D), "v": rnd(B, H, L, D),
            "eta": rnd(B, H, L).abs()}  # fmt: skip


def ln():
    return {"ln_weight": torch.ones(H, D), "ln_bias": torch.zeros(H, D)}


def mlp_weights(prefix="W", bias="b"):
    return {f"{prefix}10": rnd(B, H, D, F), f"{bias}10": rnd(B, H, F),
            f"{prefix}20": rnd(B, H, F, D), f"{bias}20": rnd(B, H, D)}  # fmt: skip


def linear_fwd_args():
    return {**seq(), "W0": rnd(B, H, D, D), "b0": rnd(B, H, D), **ln(), "scale": torch.ones(b),
            "mini_batch_size": b, "causal": True, "eps": 1e-6}  # fmt: skip


def mlp_fwd_args():
    return {**seq(), **mlp_weights(), **ln(), "scale": torch.ones(b), "mini_batch_size": b,
            "causal": True, "eps": 1e-6}  # fmt: skip


def titans_fwd_args():
    return {**seq(), "mom": rnd(B, H, L), "dec": rnd(B, H, L).abs(),
            **{n: rnd(B, H, D, D) for n in ("W0", "C0", "S0")},
            **{n: rnd(B, H, D) for n in ("b0", "cb0", "sb0")}, **ln(), "mini_batch_size": b,
            "eps": 1e-6}  # fmt: skip


def titans_mlp_fwd_args():
    return {**seq(), "mom": rnd(B, H, L), "dec": rnd(B, H, L).abs(), **mlp_weights(),
            **mlp_weights("C", "cb"), **mlp_weights("S", "sb"), **ln(), "mini_batch_size": b,
            "eps": 1e-6}  # fmt: skip


def bwd_args(fwd, make_fwd_args, outs: str, graded: int, drop: str):
    """A backward's arguments from a forward call: its inputs less ``drop``, its per-segment
    starts (the ``outs`` named ``*_starts``) and a random gradient of o (dO) and of the next
    ``graded`` outputs (d<name>)."""
    inputs = make_fwd_args()
    res = dict(zip(outs.split(), fwd(**inputs)))
    grads = {("dO" if n == "o" else f"d{n}"): torch.randn_like(t)
             for n, t in list(res.items())[: 1 + graded]}  # fmt: skip
    starts = {n: t for n, t in res.items() if n.endswith("_starts")}
    return {**{n: t for n, t in inputs.items() if n not in drop.split()}, **starts, **grads}


def linear_bwd_args():
    return bwd_args(linear_fwd, linear_fwd_args, "o W_end b_end W_starts b_starts", 4, "W0 b0")


def mlp_bwd_args():
    outs = "o W1_end b1_end W2_end b2_end W1_starts b1_starts W2_starts b2_starts"
    return bwd_args(mlp_fwd, mlp_fwd_args, outs, 8, "W10 b10 W20 b20")


def titans_bwd_args():
    outs = "o W_end b_end S_end sb_end W_starts b_starts S_starts sb_starts"
    return bwd_args(titans_fwd, titans_fwd_args, outs, 6, "W0 b0 S0 sb0")


def titans_mlp_bwd_args():
    outs = ("o W1_end b1_end W2_end b2_end S1_end sb1_end S2_end sb2_end W1_starts b1_starts "
            "W2_starts b2_starts S1_starts sb1_starts S2_starts sb2_starts C1_starts cb1_starts "
            "C2_starts cb2_starts")  # fmt: skip
    drop = "W10 b10 W20 b20 C10 cb10 C20 cb20 S10 sb10 S20 sb20"
    return bwd_args(titans_mlp_fwd, titans_mlp_fwd_args, outs, 12, drop)


OPS = {
    "linear_fwd": (linear_fwd, linear_fwd_args),
    "linear_bwd": (linear_bwd, linear_bwd_args),
    "mlp_fwd": (mlp_fwd, mlp_fwd_args),
    "mlp_bwd": (mlp_bwd, mlp_bwd_args),
    "titans_fwd": (titans_fwd, titans_fwd_args),
    "titans_bwd": (titans_bwd, titans_bwd_args),
    "titans_mlp_fwd": (titans_mlp_fwd, titans_mlp_fwd_args),
    "titans_mlp_bwd": (titans_mlp_bwd, titans_mlp_bwd_args),
}

BAD = {  # a defect -> (the change, the error)
    "B=1": (lambda t: t[:1], ValueError),
    "shorter-L": (lambda t: t[:, :, :-1], ValueError),
    "float64": (lambda t: t.double(), TypeError),
    "one-short": (lambda t: t[:-1], ValueError),
    "shape-1x2": (lambda t: torch.ones(1, 2), ValueError),
    "3-D": (lambda t: t[0], ValueError),
}

CASES = {  # op -> (argument, defect)
    "linear_fwd": [("W0", "B=1"), ("b0", "B=1"), ("k", "shorter-L"), ("v", "float64"),
                   ("eta", "float64"), ("eta", "shorter-L"), ("scale", "one-short"),
                   ("ln_weight", "shape-1x2"), ("q", "3-D")],
    "linear_bwd": [("W_starts", "B=1"), ("dW_end", "float64"), ("dO", "shorter-L"),
                   ("db_starts", "one-short"), ("scale", "one-short"), ("ln_bias", "shape-1x2")],
    "mlp_fwd": [("W20", "B=1"), ("k", "shorter-L"), ("eta", "float64"), ("scale", "one-short"),
                ("ln_weight", "shape-1x2")],
    "mlp_bwd": [("b2_starts", "B=1"), ("dW1_end", "float64"), ("dO", "float64"),
                ("dW2_starts", "one-short"), ("ln_bias", "shape-1x2")],
    "titans_fwd": [("C0", "B=1"), ("mom", "float64"), ("dec", "shorter-L"),
                   ("ln_weight", "shape-1x2")],
    "titans_bwd": [("S_starts", "B=1"), ("dS_end", "float64"), ("dO", "shorter-L"),
                   ("cb0", "one-short")],
    "titans_mlp_fwd": [("S20", "B=1"), ("k", "shorter-L"), ("dec", "float64"),
                       ("ln_weight", "shape-1x2")],
    "titans_mlp_bwd": [("C2_starts", "B=1"), ("dsb1_end", "float64"), ("v", "shorter-L"),
                       ("ln_bias", "shape-1x2")],
}  # fmt: skip


@pytest.mark.parametrize("op", OPS)
def test_valid_call_runs(op):
    fn, make_args = OPS[op]
    outs = fn(**make_args())
    assert all(torch.isfinite(t).all() for t in outs)


@pytest.mark.parametrize(
    "op,arg,defect", [(op, a, d) for op, cases in CASES.items() for a, d in cases],
    ids=[f"{op}-{a}-{d}" for op, cases in CASES.items() for a, d in cases],
)  # fmt: skip
def test_a_mismatched_argument_raises_naming_it(op, arg, defect):
    fn, make_args = OPS[op]
    change, error = BAD[defect]
    args = make_args()
    args[arg] = change(args[arg])
    with pytest.raises(error, match=re.escape(f"ttt::{op}: {arg} must")):
        fn(**args)


def test_a_tensor_on_another_device():
    """A meta tensor among the inputs sends the op to its fake impl (the dispatcher ranks meta
    above CPU): no kernel runs. The guard itself refuses it, as it does a CUDA tensor with CPU q."""
    args = linear_fwd_args()
    outs = linear_fwd(**{**args, "W0": args["W0"].to("meta")})
    assert outs[1].device.type == "meta"
    with pytest.raises(ValueError, match=re.escape("ttt::linear_fwd: W0 must be on q's device")):
        check_contract("linear_fwd", args["q"], {"k": args["k"]},
                       {"W0": (args["W0"].to("meta"), "B H D D")})  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("ttt::linear_fwd: k must be on q's device")):
        check_contract("linear_fwd", args["q"], {"k": args["k"].to("meta")}, {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_tensor_with_cpu_q_raises():
    args = linear_fwd_args()
    with pytest.raises(ValueError, match=re.escape("ttt::linear_fwd: W0 must be on q's device")):
        linear_fwd(**{**args, "W0": args["W0"].cuda()})


@pytest.mark.parametrize("op", ["titans_fwd", "titans_mlp_fwd"])
def test_mini_batch_size_zero_raises(op):
    """The block count divides by it (a SIGFPE in the C++ before this check)."""
    fn, make_args = OPS[op]
    with pytest.raises(ValueError, match="mini_batch_size must be >= 1"):
        fn(**{**make_args(), "mini_batch_size": 0})


def test_the_message_gives_expected_and_got():
    args = linear_fwd_args()
    args["W0"] = args["W0"][:1, :1]
    want = "ttt::linear_fwd: W0 must have shape [B=2, H=2, D=4, D=4], got [1, 1, 4, 4]"
    with pytest.raises(ValueError, match=re.escape(want)):
        linear_fwd(**args)
