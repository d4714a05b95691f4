"""ttt-core on CPU, side by side in one run: the torch backend vs the paths it replaces.

Measured (forward, and forward+backward) at B=2, H=4, D=64, b=16, L in {512, 2048}, TTT-Linear and
TTT-MLP, 1 thread (2 threads are erratic on shared 2-core machines):

- ``torch``: ttt-core's torch backend (dual form, coefficients batched over mini-batches)
- ``generic``: ttt-core's torch.func reference (per-token gradients, explicit per-token weights)
- ``per_token_loop``: a Python loop over tokens, each token's gradient and weights by hand
- ``paper_dual``: the dual form as the TTT paper's PyTorch reference writes it: a Python loop over
  mini-batches, batched over B and H, everything (LN forward included) inside the loop

Gradient checkpointing (``checkpoint_group_size``): forward+backward of the torch backend at B=2,
H=4, D=64, b=16, L=8192, without it and with groups of G mini-batches, time and peak memory (the
process's peak RSS increase over the inputs in one call after the timed ones, by Linux VmHWM
reset before it; each configuration in a fresh process).

Run: ``python benchmarks/core_cpu.py`` (writes benchmarks/results/core_cpu.json; ``--quick`` for a
smoke run; ``--checkpoint-only`` for the checkpointing rows alone, written to
benchmarks/results/core_cpu_checkpoint.json). The paths of one shape and mode run in turn, round
after round (``--repeat`` rounds after a warm-up round), so that a busy spell of a shared machine
slows them alike; times are medians, speed-ups the median of the round-by-round ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import machine_info, output_path, reset_peak_rss, rss_mib, trim_heap

from ttt_core import ttt_linear, ttt_mlp


# ---------------------------------------------------------------------------------------------
# the two simpler paths, written here the way one would without ttt-core
# ---------------------------------------------------------------------------------------------
def _ln_fwd(z, w, b, eps=1e-6):
    mu = z.mean(-1, keepdim=True)
    var = z.var(-1, keepdim=True, unbiased=False)
    return (z - mu) / torch.sqrt(var + eps) * w + b


def _ln_l2_bwd(z, target, w, b, eps=1e-6):
    """Gradient of 0.5||LN(z) - target||^2 wrt z (the paper's ln_fused_l2_bwd)."""
    D = z.shape[-1]
    mu = z.mean(-1, keepdim=True)
    var = z.var(-1, keepdim=True, unbiased=False)
    std = torch.sqrt(var + eps)
    x_hat = (z - mu) / std
    y = w * x_hat + b
    grad_x_hat = (y - target) * w
    return (
        (1.0 / D)
        * (
            D * grad_x_hat
            - grad_x_hat.sum(-1, keepdim=True)
            - x_hat * (grad_x_hat * x_hat).sum(-1, keepdim=True)
        )
        / std
    )


def paper_dual_linear(q, k, v, eta, W1, b1, lw, lb, b):
    """Loop over mini-batches; the 'mean' token scale folded into an eta matrix as in the paper."""
    B, _, L, _ = q.shape
    W, bias = W1.unsqueeze(0).expand(B, -1, -1, -1), b1.unsqueeze(0).expand(B, -1, -1, -1)
    w, bb = lw[None, :, None], lb[None, :, None]
    scale = 1.0 / torch.arange(1, b + 1, dtype=q.dtype)
    outs = []
    for s in range(0, L, b):
        XQ, XK, XV, e = (
            q[:, :, s : s + b],
            k[:, :, s : s + b],
            v[:, :, s : s + b],
            eta[:, :, s : s + b],
        )
        n = XQ.shape[2]
        Eta = torch.tril(scale[:n, None] * e[:, :, None, :])  # (B, H, n, n)
        Z1 = XK @ W + bias
        grad = _ln_l2_bwd(Z1, XV - XK, w, bb)
        Attn = torch.tril(XQ @ XK.transpose(-1, -2))
        b_bar = bias - Eta @ grad
        Z_bar = XQ @ W - (Eta * Attn) @ grad + b_bar
        last = Eta[:, :, -1, :, None]  # (B, H, n, 1)
        W = W - (last * XK).transpose(-1, -2) @ grad
        bias = bias - (last * grad).sum(-2, keepdim=True)
        outs.append(XQ + _ln_fwd(Z_bar, w, bb))
    return torch.cat(outs, 2)


def paper_dual_mlp(q, k, v, eta, W1, b1, W2, b2, lw, lb, b):
    B, _, L, _ = q.shape
    Wa, ba = W1.unsqueeze(0).expand(B, -1, -1, -1), b1.unsqueeze(0).expand(B, -1, -1, -1)
    Wb, bb2 = W2.unsqueeze(0).expand(B, -1, -1, -1), b2.unsqueeze(0).expand(B, -1, -1, -1)
    w, bb = lw[None, :, None], lb[None, :, None]
    scale = 1.0 / torch.arange(1, b + 1, dtype=q.dtype)
    outs = []
    for s in range(0, L, b):
        XQ, XK, XV, e = (
            q[:, :, s : s + b],
            k[:, :, s : s + b],
            v[:, :, s : s + b],
            eta[:, :, s : s + b],
        )
        n = XQ.shape[2]
        Eta = torch.tril(scale[:n, None] * e[:, :, None, :])
        Z1 = XK @ Wa + ba
        X2 = F.gelu(Z1, approximate="tanh")
        Z2 = X2 @ Wb + bb2
        g2 = _ln_l2_bwd(Z2, XV - XK, w, bb)
        t = torch.tanh(math.sqrt(2 / math.pi) * (Z1 + 0.044715 * Z1**3))
        dgelu = 0.5 * (1 + t) + 0.5 * Z1 * (1 - t * t) * math.sqrt(2 / math.pi) * (
            1 + 3 * 0.044715 * Z1**2
        )
        g1 = (g2 @ Wb.transpose(-1, -2)) * dgelu
        Attn1 = torch.tril(XQ @ XK.transpose(-1, -2))
        Z1_bar = XQ @ Wa - (Eta * Attn1) @ g1 + ba - Eta @ g1
        X2_bar = F.gelu(Z1_bar, approximate="tanh")
        Attn2 = torch.tril(X2_bar @ X2.transpose(-1, -2))
        Z2_bar = X2_bar @ Wb - (Eta * Attn2) @ g2 + bb2 - Eta @ g2
        last = Eta[:, :, -1, :, None]
        Wa = Wa - (last * XK).transpose(-1, -2) @ g1
        ba = ba - (last * g1).sum(-2, keepdim=True)
        Wb = Wb - (last * X2).transpose(-1, -2) @ g2
        bb2 = bb2 - (last * g2).sum(-2, keepdim=True)
        outs.append(XQ + _ln_fwd(Z2_bar, w, bb))
    return torch.cat(outs, 2)


def per_token_loop(q, k, v, eta, weights, lw, lb, b, kind):
    """A loop over tokens: each token's gradient at its mini-batch's start weights, weights by hand."""
    B, _, L, _ = q.shape
    w, bb = lw[None, :], lb[None, :]
    P = {n: t.unsqueeze(0).expand(B, *t.shape) for n, t in weights.items()}
    outs = []
    for s in range(0, L, b):
        acc = {n: torch.zeros_like(t) for n, t in P.items()}
        for i in range(s, min(s + b, L)):
            x, tgt, e = (
                k[:, :, i : i + 1],
                v[:, :, i : i + 1] - k[:, :, i : i + 1],
                eta[:, :, i, None, None],
            )
            if kind == "linear":
                g = _ln_l2_bwd(x @ P["W1"] + P["b1"], tgt, w[:, :, None], bb[:, :, None])
                step = {"W1": x.transpose(-1, -2) @ g, "b1": g}
            else:
                z1 = x @ P["W1"] + P["b1"]
                x2 = F.gelu(z1, approximate="tanh")
                g2 = _ln_l2_bwd(x2 @ P["W2"] + P["b2"], tgt, w[:, :, None], bb[:, :, None])
                z1r = z1.detach().requires_grad_(True)  # gelu' by autograd on a detached copy
                with torch.enable_grad():
                    (dg,) = torch.autograd.grad(F.gelu(z1r, approximate="tanh").sum(), z1r)
                g1 = (g2 @ P["W2"].transpose(-1, -2)) * dg
                step = {
                    "W1": x.transpose(-1, -2) @ g1,
                    "b1": g1,
                    "W2": x2.transpose(-1, -2) @ g2,
                    "b2": g2,
                }
            acc = {n: acc[n] + e * step[n] for n in acc}
            Wi = {n: P[n] - acc[n] / (i - s + 1) for n in P}
            xq = q[:, :, i : i + 1]
            if kind == "linear":
                z = xq @ Wi["W1"] + Wi["b1"]
            else:
                z = F.gelu(xq @ Wi["W1"] + Wi["b1"], approximate="tanh") @ Wi["W2"] + Wi["b2"]
            outs.append(xq + _ln_fwd(z, w[:, :, None], bb[:, :, None]))
        P = Wi
    return torch.cat(outs, 2)


# ---------------------------------------------------------------------------------------------
def make(kind, B, H, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(B, H, L, D, generator=g) for _ in range(3)]
    eta = 0.1 * torch.rand(B, H, L, generator=g)
    if kind == "linear":
        w = {"W1": 0.02 * torch.randn(H, D, D, generator=g), "b1": torch.zeros(H, 1, D)}
    else:
        w = {"W1": 0.02 * torch.randn(H, D, 4 * D, generator=g), "b1": torch.zeros(H, 1, 4 * D),
             "W2": 0.01 * torch.randn(H, 4 * D, D, generator=g), "b2": torch.zeros(H, 1, D)}  # fmt: skip
    ln = [torch.ones(H, D), torch.zeros(H, D)]
    return x, eta, w, ln


def runner(impl, kind, b):
    def run(x, eta, w, ln):
        q, k, v = x
        if impl in ("torch", "generic"):
            fn = ttt_linear if kind == "linear" else ttt_mlp
            return fn(q, k, v, eta, *w.values(), *ln, mini_batch_size=b, backend=impl)[0]
        if impl == "paper_dual":
            fn = paper_dual_linear if kind == "linear" else paper_dual_mlp
            return fn(q, k, v, eta, *w.values(), *ln, b)
        return per_token_loop(q, k, v, eta, w, *ln, b, kind)

    return run


def timer(fn, inputs, backward):
    """A function that runs ``fn`` once (forward, or forward+backward) and returns its seconds."""
    x, eta, w, ln = inputs
    leaves = [*x, eta, *w.values(), *ln]

    def once():
        for t in leaves:
            t.grad = None
            t.requires_grad_(backward)
        t0 = time.perf_counter()
        if backward:
            fn(x, eta, w, ln).sum().backward()
        else:
            with torch.no_grad():
                fn(x, eta, w, ln)
        return time.perf_counter() - t0

    return once


def measure(fn, inputs, backward, repeat):
    """Median seconds of ``repeat`` runs after one warm-up."""
    once = timer(fn, inputs, backward)
    once()  # warm-up
    return statistics.median(once() for _ in range(repeat))


def measure_interleaved(fns, inputs, backward, repeat):
    """Every function of ``fns`` (name -> fn) once per round, ``repeat`` rounds after a warm-up
    round, so that a slow spell of a shared machine hits all of them alike: name -> [seconds]."""
    onces = {name: timer(fn, inputs, backward) for name, fn in fns.items()}
    for once in onces.values():
        once()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, once in onces.items():
            times[name].append(once())
    return times


def _checkpoint_child(kind, L, group, repeat, queue):
    """One checkpointing configuration in a fresh process: (median seconds, peak RSS increase MB).

    The peak is that of one more forward+backward after the timed ones (so the first call's one-time
    costs, library pages and lazy initialisation, are left out): VmHWM, reset just before it
    (``reset_peak_rss``), minus the RSS then. A lifetime high-water mark such as ``ru_maxrss``
    would hide any peak below the process's earlier ones."""
    torch.set_num_threads(1)
    inputs = make(kind, 2, 4, L, 64)
    fn = ttt_linear if kind == "linear" else ttt_mlp

    def run(x, eta, w, ln):
        return fn(*x, eta, *w.values(), *ln, mini_batch_size=16, checkpoint_group_size=group)[0]

    sec = measure(run, inputs, True, repeat)
    once = timer(run, inputs, True)
    trim_heap()
    base = rss_mib("VmRSS")
    reset_peak_rss()
    once()
    queue.put((sec, rss_mib("VmHWM") - base))


def checkpoint_rows(L, groups, repeat):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    rows = []
    for kind in ("linear", "mlp"):
        for group in groups:
            queue = ctx.Queue()
            proc = ctx.Process(target=_checkpoint_child, args=(kind, L, group, repeat, queue))
            proc.start()
            sec, peak_mb = queue.get()
            proc.join()
            rows.append(dict(kind=kind, L=L, checkpoint_group_size=group, seconds=sec,
                             peak_rss_increase_mb=round(peak_mb, 1)))  # fmt: skip
            print(f"{kind:6} L={L} checkpoint_group_size={group!s:5} forward+backward "
                  f"{sec * 1e3:9.1f} ms  peak +{peak_mb:8.1f} MB", flush=True)  # fmt: skip
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small L and one repeat (smoke test)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: see output_path)")
    p.add_argument("--checkpoint-only", action="store_true", help="only the checkpointing rows")
    p.add_argument(
        "--impls",
        default="torch,paper_dual,generic,per_token_loop",
        help="comma-separated paths to time (torch is always timed: the others are compared with it);"
        " the generic reference at TTT-MLP L=2048 forward+backward peaks near 20 GB",
    )
    p.add_argument(
        "--no-checkpointing", action="store_true", help="skip the checkpoint_group_size rows"
    )
    a = p.parse_args(argv)
    a.out = output_path(a.out, a.quick, "core_cpu.json")
    torch.set_num_threads(1)
    ck_L, ck_groups = (512, [None, 4]) if a.quick else (8192, [None, 4, 16])
    if a.checkpoint_only:
        out = (
            a.out.with_name(a.out.stem + "_checkpoint.json")
            if a.out.name == "core_cpu.json"
            else a.out
        )
        result = {
            "benchmark": "ttt-core CPU: forward+backward with and without checkpoint_group_size",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "shapes": dict(B=2, H=4, D=64, mini_batch_size=16, L=ck_L, dtype="float32"),
            "machine": machine_info(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "rows": checkpoint_rows(ck_L, ck_groups, 1 if a.quick else a.repeat),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
        return
    B, H, D, b = 2, 4, 64, 16
    lengths = [64, 128] if a.quick else [512, 2048]
    repeat = 1 if a.quick else a.repeat
    known = ("torch", "paper_dual", "generic", "per_token_loop")
    impls = ["torch", *(i for i in a.impls.split(",") if i and i != "torch")]
    if unknown := [i for i in impls if i not in known]:
        p.error(f"--impls: unknown {unknown}; choose from {', '.join(known)}")
    rows, ratios = [], []
    for kind in ("linear", "mlp"):
        for L in lengths:
            inputs = make(kind, B, H, L, D)
            ref = runner("torch", kind, b)(*inputs)
            err = {}  # every path computes the same thing
            for impl in impls:
                err[impl] = (runner(impl, kind, b)(*inputs) - ref).abs().max().item()
            fns = {impl: runner(impl, kind, b) for impl in impls}
            for mode in ("forward", "forward+backward"):
                times = measure_interleaved(fns, inputs, mode != "forward", repeat)
                for impl in impls:
                    sec = statistics.median(times[impl])
                    rows.append(dict(kind=kind, L=L, impl=impl, mode=mode, seconds=sec,
                                     max_abs_diff_vs_torch=err[impl]))  # fmt: skip
                    print(f"{kind:6} L={L:5} {impl:15} {mode:17} {sec * 1e3:9.1f} ms  "
                          f"(|diff| {err[impl]:.1e})", flush=True)  # fmt: skip
                    if impl != "torch":  # the median of the round-by-round ratios
                        pairs = zip(times[impl], times["torch"], strict=True)
                        ratio = statistics.median(t / t0 for t, t0 in pairs)
                        ratios.append(dict(kind=kind, L=L, mode=mode, vs=impl,
                                           speedup_of_torch_backend=ratio))  # fmt: skip
    result = {
        "benchmark": "ttt-core CPU: torch backend vs generic, per-token loop, paper-style dual form",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "shapes": dict(B=B, H=H, D=D, mini_batch_size=b, lengths=lengths, dtype="float32"),
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "rows": rows,
        "speedups": ratios,
        "checkpointing": None if a.no_checkpointing else checkpoint_rows(ck_L, ck_groups, repeat),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print("\nspeed-up of the torch backend (time of other / time of torch):")
    for r in ratios:
        print(
            f"  {r['kind']:6} L={r['L']:5} {r['mode']:17} vs {r['vs']:15} x{r['speedup_of_torch_backend']:.2f}"
        )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
