"""``ttt-moshi-demo --out DIR``: a small Moshi-architecture LM fine-tuned with vs without TTT.

Data (a real signal that installs everywhere, offline): the English text of the Python language
reference help topics that ship inside CPython itself (``pydoc_data.topics``, ~465k characters of
human-written documentation with code), as UTF-8 bytes in Moshi's text stream (``text_card=256``).
Mimi codes of speech would be the real target, but the Mimi weights cannot be downloaded here; the
TTT layers sit in Moshi's temporal transformer, which sees the same kind of token stream either way.
The model is Moshi's ``LMModel`` in its text-only form (``n_q=0``, no depformer), random init.

Both variants use the same local attention windows (the issue's setup, scaled down: the TTT layers
attend ``W/2`` steps, the others ``W``); the TTT variant adds TTT-Linear blocks (mini-batch 16,
tanh(alpha) gate) to half the layers. Each trained model then reads held-out sequences
``--long-factor`` (8) times the training length in streaming mode (`streaming_per_position_loss`:
state carried, memory bounded; the resident memory is sampled at 1, 2, 4, 8 x the training length).
Then `memory_probe` measures why TTT does or does not help past the window: the loss on names
that recur beyond the attention's reach vs names seen for the first time, with and without TTT;
the TTT gates and the size of the TTT output after training; the inner loss per mini-batch.
Written to DIR: ``loss_per_position.png``, ``loss_difference.png``, ``long_context_loss.png``,
``train_loss.png``, ``memory_analysis.png``, ``summary.json`` (+ the shards and the metrics of
each run).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import FinetuneConfig
from .data import save_shard
from .evaluate import (
    loss_slope,
    plot_loss_curves,
    resident_bytes,
    smooth,
    streaming_per_position_loss,
)
from .layer import TTTStreamingTransformerLayer
from .losses import on_model_device
from .memory_probe import (
    category_differences,
    category_losses,
    fast_weights_reset_every_mini_batch,
    gate_report,
    inner_loss_by_mini_batch,
    name_recurrence,
    text_token_losses,
    ttt_inputs,
)
from .train import Trainer

DATA_SOURCE = (
    "CPython's bundled help topics (pydoc_data.topics: the Python language reference text, "
    "PSF license), UTF-8 bytes as Moshi text tokens"
)

PCT_START = 0.1  # the learning rate's warm-up: this fraction of --steps


def corpus_bytes() -> np.ndarray:
    """The help-topic texts, sorted by topic name, as uint8 tokens [N]."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def lm_kwargs(dim: int, layers: int, heads: int) -> dict[str, Any]:
    """Moshi 7B's main-transformer recipe (rope, RMSNorm f32, SiLU gating), text only, small."""
    return dict(
        delays=[0], n_q=0, dep_q=0, card=1, text_card=256, dim=dim, num_heads=heads,
        num_layers=layers, hidden_scale=4.125, causal=True, layer_scale=None, context=3000,
        gating="silu", norm="rms_norm_f32", positional_embedding="rope", max_period=10000,
        existing_text_padding_id=3,
    )  # fmt: skip


def demo_ttt_layers(layers: int) -> list[int]:
    """The layers the TTT variant converts: every second one from layer 1 (none with 1 layer)."""
    return list(range(1, layers, 2))


def attention_contexts(window: int, layers: int) -> list[int]:
    """Each layer's attention window (both variants): ``window // 2`` on the TTT layers."""
    ttt = demo_ttt_layers(layers)
    return [window // 2 if i in ttt else window for i in range(layers)]


def _at_least(minimum: int) -> Any:
    """An argparse ``type``: an int >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks between arguments, before any work (``p.error``: exit status 2)."""
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        p.error(
            f"argument --heads: must divide --dim {args.dim} into heads of an even size "
            f"(rotary embeddings), got {args.heads}"
        )
    if args.steps * PCT_START <= 1 or (1 - PCT_START) * args.steps <= 1:
        p.error(
            f"argument --steps: must be >= {int(1 / PCT_START) + 1} (the warm-up, "
            f"{PCT_START:.0%} of the steps, needs more than one), got {args.steps}"
        )
    if args.eval_windows == 1:
        p.error(
            "argument --eval-windows: must be 0 (all) or >= 2 (the inner-loss control reads "
            "another window), got 1"
        )
    if args.lr <= 0:
        p.error(f"argument --lr: must be > 0, got {args.lr}")
    reach = sum(c - 1 for c in attention_contexts(args.window, args.layers))
    if args.seq_len < reach + 2:
        p.error(
            f"argument --seq-len: must be >= {reach + 2} (the attention reach of "
            f"{args.layers} layers with --window {args.window}, {reach} steps, + 2: the loss is "
            f"measured beyond it), got {args.seq_len}"
        )
    held = int(len(corpus_bytes()) * 0.2)
    if args.long_factor * args.seq_len > held:
        p.error(
            f"argument --long-factor: --long-factor x --seq-len = {args.long_factor * args.seq_len}"
            f" steps is longer than the held-out text ({held} bytes)"
        )


def _write_shards(
    out: Path, tokens: np.ndarray, seq_len: int, eval_frac: float
) -> tuple[Path, Path]:
    n_eval = int(len(tokens) * eval_frac)
    train, held = tokens[:-n_eval], tokens[-n_eval:]
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    # one [K=1, T] recording per shard; the loader cuts it into seq_len windows
    return save_shard(data / "train.npz", train[None]), save_shard(data / "eval.npz", held[None])


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = corpus_bytes()
    train_path, eval_path = _write_shards(out, tokens, args.seq_len, 0.2)
    kwargs = lm_kwargs(args.dim, args.layers, args.heads)
    ttt_layers = demo_ttt_layers(args.layers)
    window = args.window
    base = {
        "data": {"train_data": [str(train_path)], "eval_data": [str(eval_path)]},
        "duration_sec": args.seq_len / 12.5, "batch_size": args.batch_size,
        "max_steps": args.steps, "max_norm": 1.0, "log_freq": 25, "seed": args.seed,
        "optim": {"lr": args.lr, "weight_decay": 0.1, "pct_start": PCT_START},
        "model": {"lm_kwargs": kwargs},
        # every layer attends `window` steps; the TTT variant's TTT layers attend window // 2
        "attention_context": dict(enumerate(attention_contexts(window, args.layers))),
        "ttt_attention_context": None,
    }  # fmt: skip
    variants = {
        "moshi (local attention)": {"ttt": {"layers": []}},
        "moshi + TTT-Linear": {
            "ttt": {
                "layers": ttt_layers,
                "config": {
                    "inner": "linear",
                    "num_heads": args.heads,  # full TTT width for the small demo model
                    "mini_batch_size": 16,
                    "gate_init": 0.1,
                },
            },
        },
    }
    curves: dict[str, np.ndarray] = {}
    long_curves: dict[str, np.ndarray] = {}
    held = tokens[-int(len(tokens) * 0.2) :]  # the eval shard's bytes
    long_len = args.long_factor * args.seq_len
    n_long = min(args.long_sequences, len(held) // long_len)
    long_codes = torch.from_numpy(held[: n_long * long_len].reshape(n_long, 1, long_len))
    summary: dict[str, Any] = {"variants": {}}
    eval_windows = None
    histories = {}
    memory: dict[str, Any] = {"variants": {}}
    for name, extra in variants.items():
        slug = "ttt" if extra["ttt"]["layers"] else "baseline"
        cfg = FinetuneConfig.from_dict({**base, **extra, "run_dir": str(out / f"run_{slug}")})
        t0 = time.perf_counter()
        trainer = Trainer(cfg, progress=True, overwrite=True)  # a rerun replaces the demo's run
        trainer.fit()
        train_s = time.perf_counter() - t0
        if eval_windows is None:
            assert trainer.eval_data is not None
            g = torch.Generator().manual_seed(123)
            n_eval = len(trainer.eval_data) if args.eval_windows <= 0 else args.eval_windows
            idx = torch.randperm(len(trainer.eval_data), generator=g, device="cpu")[:n_eval]
            eval_windows = trainer.eval_data.windows[idx]  # (N, 1, T)
        t0 = time.perf_counter()
        token_loss = text_token_losses(trainer.lm, eval_windows)  # (N, T): text only
        curve = np.nanmean(token_loss, axis=0)  # = per_position_loss (K = 1)
        eval_s = time.perf_counter() - t0
        curves[name] = curve
        histories[name] = [r["loss"] for r in trainer.history]
        w = window
        contexts = [m.self_attn.context for m in trainer.lm.transformer.layers]
        # stacked local attention reaches sum(c - 1) steps back; beyond that only TTT remembers
        reach = sum(c - 1 for c in contexts)
        if "name_masks" not in memory:
            memory["name_masks"] = name_recurrence(eval_windows[:, 0].numpy(), reach)
        memory["variants"][name] = category_losses(token_loss, memory["name_masks"])
        memory.setdefault("token_losses", []).append(token_loss)
        if slug == "ttt":
            probe = ttt_inputs(trainer.lm, eval_windows[: args.probe_windows])
            memory["gates"] = gate_report(trainer.lm, probe)
            with fast_weights_reset_every_mini_batch(trainer.lm):
                no_carry = text_token_losses(trainer.lm, eval_windows)  # (N, T)
            memory["carry_minus_no_carry"] = category_differences(
                token_loss, no_carry, memory["name_masks"]
            )
            layers = trainer.lm.transformer.layers
            memory["inner_loss_by_mini_batch"] = {
                f"layer{i}": inner_loss_by_mini_batch(layers[i], h)
                for i, (_, h, _) in probe.items()
            }
        rec: dict[str, Any] = {
            "ttt_layers": extra["ttt"]["layers"],
            "attention_context": contexts,
            "attention_receptive_field": reach,
            "parameters": sum(p.numel() for p in trainer.lm.parameters()),
            "train_seconds": round(train_s, 2),
            "eval_seconds": round(eval_s, 2),
            "final_train_loss_avg_last_20": float(np.mean(histories[name][-20:])),
            "eval_loss_mean": float(curve.mean()),
            "eval_loss_inside_window": float(curve[:w].mean()),
            "eval_loss_beyond_window": float(curve[w:].mean()),
            "eval_loss_last_quarter": float(curve[-len(curve) // 4 :].mean()),
            "eval_loss_beyond_receptive_field": float(curve[reach:].mean()),
            "slope_per_doubling_beyond_window": loss_slope(curve, start=w),
            "slope_per_doubling_beyond_receptive_field": loss_slope(curve, start=reach),
            "skipped_steps": sum(r["skipped"] for r in trainer.history),
        }
        inner = {k: v for k, v in trainer.history[-1 - (len(trainer.history) - 1) % 25].items()
                 if "inner_loss" in k}  # fmt: skip
        if inner:
            rec["inner_loss_last_monitored_step"] = inner
        rec["long_context"], long_curves[name] = _long_context(
            trainer.lm, long_codes, args.seq_len, w
        )
        if slug == "ttt":
            rec["streaming_max_abs_diff"] = _streaming_check(trainer.lm, eval_windows[:1, :, :64])
        summary["variants"][name] = rec
    names = list(variants)
    b, t = (summary["variants"][n] for n in names)
    summary["ttt_minus_baseline"] = {
        k: t[k] - b[k]
        for k in (
            "eval_loss_mean",
            "eval_loss_inside_window",
            "eval_loss_beyond_window",
            "eval_loss_beyond_receptive_field",
            "eval_loss_last_quarter",
        )
    }
    summary["memory"] = _memory_summary(memory, reach)
    summary.update(
        data_source=DATA_SOURCE, corpus_tokens=len(tokens), seq_len=args.seq_len,
        attention_window=window, ttt_attention_window=window // 2, eval_windows=len(eval_windows),
        model=kwargs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
    )  # fmt: skip
    plot_loss_curves(
        curves, out / "loss_per_position.png",
        windows={
            f"window {window}": window,
            f"attention reach {b['attention_receptive_field']}": b["attention_receptive_field"],
        },
        title=f"held-out per-position loss ({len(eval_windows)} windows of {args.seq_len} bytes)",
    )  # fmt: skip
    plot_loss_curves(
        long_curves, out / "long_context_loss.png",
        windows={"training length": args.seq_len, f"window {window}": window},
        smooth_width=33,
        title=f"streaming, {args.long_factor}x the training length ({n_long} sequences)",
    )  # fmt: skip
    _plot_train(histories, out / "train_loss.png")
    _plot_memory(summary["memory"], out / "memory_analysis.png")
    _plot_difference(curves, out / "loss_difference.png", b["attention_receptive_field"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    np.savez(out / "curves.npz", **{n.replace(" ", "_"): c for n, c in curves.items()})
    return summary


def _memory_summary(memory: dict[str, Any], reach: int) -> dict[str, Any]:
    """The `memory_probe` results for summary.json: loss by name category per variant and the
    TTT variant's gain on each; the gates; the inner loss per mini-batch (and its means)."""
    inner = memory["inner_loss_by_mini_batch"]
    base_loss, ttt_loss = memory["token_losses"]  # (N, T) each, the variants in order
    return {
        "attention_reach": reach,
        "loss_by_name_category": memory["variants"],
        "ttt_minus_baseline": category_differences(ttt_loss, base_loss, memory["name_masks"]),
        "ttt_carry_minus_no_carry": memory["carry_minus_no_carry"],
        "gates": memory["gates"],
        "inner_loss_mean": {
            layer: {k: float(np.mean(v)) for k, v in curves.items() if k != "start"}
            for layer, curves in inner.items()
        },
        "inner_loss_by_mini_batch": inner,
    }


def _long_context(
    lm: torch.nn.Module, codes: torch.Tensor, train_len: int, window: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Per-position loss of ``codes`` [N, 1, T] read in streaming mode (state carried, memory
    bounded), by context band, its slope per doubling, and the resident memory as it reads."""
    T = codes.shape[-1]
    marks = sorted({train_len * 2**i for i in range(8) if train_len * 2**i <= T})
    rss: dict[int, int] = {}

    def sample(step: int) -> None:
        if step in marks:
            rss[step] = resident_bytes()

    t0 = time.perf_counter()
    sums, counts = streaming_per_position_loss(lm, codes, on_step=sample)
    curve = sums / np.maximum(counts, 1)
    bands = {f"{a}-{b}": float(curve[a:b].mean()) for a, b in zip([0, *marks[:-1]], marks)}
    report = {
        "length": T,
        "sequences": int(codes.shape[0]),
        "loss_by_context": bands,
        "slope_per_doubling_beyond_window": loss_slope(curve, start=window),
        "slope_per_doubling_beyond_training_length": loss_slope(curve, start=train_len),
        "resident_mb_at_step": {k: round(v / 2**20, 1) for k, v in rss.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return report, curve


@torch.no_grad()
def _streaming_check(lm: torch.nn.Module, codes: torch.Tensor) -> float:
    """Max |logits| difference between step-by-step streaming and one forward pass."""
    from moshi.utils.compile import no_compile

    codes = on_model_device(lm, codes)  # the eval windows live on the CPU
    lm.eval()
    with no_compile():
        _, full = lm.forward_text(codes)
        outs = []
        with lm.streaming(codes.shape[0]):
            for t in range(codes.shape[-1]):
                outs.append(lm.forward_text(codes[:, :, t : t + 1])[1])
    assert any(isinstance(m, TTTStreamingTransformerLayer) for m in lm.modules())
    return float((torch.cat(outs, 2) - full).abs().max())


def _plot_train(histories: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, h in histories.items():
        ax.plot(smooth(np.asarray(h), 9), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / byte)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_difference(curves: dict[str, np.ndarray], path: Path, reach: int) -> None:
    """Per-position loss of the TTT variant minus the baseline's (negative: TTT helps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, ttt = curves.values()
    diff = ttt - base
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(diff, lw=0.6, alpha=0.4, label="per position")
    ax.plot(smooth(diff, 25), lw=1.5, label="moving average (25)")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.axvline(reach, ls="--", lw=0.8, color="gray", label=f"attention reach {reach}")
    ax.set_xlabel("position in the sequence (step)")
    ax.set_ylabel("loss(TTT) - loss(baseline) (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_memory(memory: dict[str, Any], path: Path) -> None:
    """Left: loss differences by name category; right: inner loss per mini-batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    counts = {
        k: v["tokens"] for k, v in next(iter(memory["loss_by_name_category"].values())).items()
    }
    bars = {
        "TTT - baseline": memory["ttt_minus_baseline"],
        "TTT model: carried - reset every mini-batch": memory["ttt_carry_minus_no_carry"],
    }
    x = np.arange(len(counts))
    for j, (label, diffs) in enumerate(bars.items()):
        left.bar(
            x + (j - 0.5) * 0.4,
            [np.nan if diffs[k]["mean"] is None else diffs[k]["mean"] for k in counts],
            width=0.4,
            yerr=[np.nan if diffs[k]["stderr"] is None else diffs[k]["stderr"] for k in counts],
            label=label,
        )
    labels = ["\n".join([*k.split(" ", 1), f"({n} bytes)"]) for k, n in counts.items()]
    left.set_xticks(x, labels, fontsize=7)
    left.axhline(0.0, color="black", lw=0.8)
    left.set_ylabel("loss difference (nats / byte)")
    left.legend(fontsize=7)
    left.set_title(f"name bytes by last occurrence (reach {memory['attention_reach']})", fontsize=9)
    for (layer, curves), color in zip(
        memory["inner_loss_by_mini_batch"].items(), ["C0", "C1", "C2", "C3"]
    ):
        for kind, style in (
            ("fresh", ":"),
            ("before_other_window", "-."),
            ("before", "-"),
            ("after", "--"),
        ):
            right.plot(curves["start"], curves[kind], style, color=color, label=f"{layer} {kind}")
    right.set_xlabel("mini-batch start (step)")
    right.set_ylabel("inner loss per token")
    right.set_title(
        "inner loss at W0, after another window, before and after the update", fontsize=9
    )
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _differences_line(diffs: dict[str, Any]) -> str:
    """``category_differences`` as one line (categories without tokens left out)."""
    return ", ".join(f"{k} {v['mean']:+.4f}" for k, v in diffs.items() if v["mean"] is not None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ttt-moshi-demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=_at_least(1), default=150)
    p.add_argument("--batch-size", type=_at_least(1), default=8)
    p.add_argument("--seq-len", type=_at_least(1), default=256, help="training window (bytes)")
    p.add_argument(
        "--window", type=_at_least(2), default=16, help="attention window of non-TTT layers"
    )
    p.add_argument("--dim", type=_at_least(2), default=64)
    p.add_argument("--heads", type=_at_least(1), default=4, help="must divide --dim")
    p.add_argument(
        "--layers", type=_at_least(2), default=4, help="TTT on every second layer from layer 1"
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-windows", type=_at_least(0), default=0, help="held-out windows (0: all)")
    p.add_argument("--threads", type=_at_least(1), default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=_at_least(0), default=0)
    p.add_argument(
        "--long-factor", type=_at_least(2), default=8, help="long-context eval: x seq-len"
    )
    p.add_argument("--long-sequences", type=_at_least(1), default=4, help="long held-out sequences")
    p.add_argument(
        "--probe-windows", type=_at_least(2), default=32, help="windows for gates/inner loss"
    )
    p.add_argument("--quick", action="store_true", help="a few steps, to check the pipeline")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_windows = 20, 8
    _check_args(p, args)
    summary = run(args)
    for name, rec in summary["variants"].items():
        print(f"{name:28s} eval loss {rec['eval_loss_mean']:.4f} (inside window "
              f"{rec['eval_loss_inside_window']:.4f}, beyond {rec['eval_loss_beyond_window']:.4f}, "
              f"slope/doubling beyond {rec['slope_per_doubling_beyond_window']:+.4f}) "
              f"train {rec['train_seconds']:.0f}s")  # fmt: skip
    memory = summary["memory"]
    gains = _differences_line(memory["ttt_minus_baseline"])
    print(f"TTT - baseline loss on name bytes by last occurrence: {gains}")
    carry = _differences_line(memory["ttt_carry_minus_no_carry"])
    print(f"TTT model, fast weights carried - reset every mini-batch: {carry}")
    for layer, g in memory["gates"].items():
        inner = memory["inner_loss_mean"][layer]
        print(f"{layer}: |tanh(alpha)| {g['gate_abs_mean']:.3f} (init {g['gate_init']}), output/"
              f"residual rms {g['output_rms_over_residual_rms']:.3f}; inner loss fresh "
              f"{inner['fresh']:.2f}, other window {inner['before_other_window']:.2f}, before "
              f"{inner['before']:.2f}, after {inner['after']:.2f}")  # fmt: skip
    print(f"wrote {Path(args.out) / 'summary.json'}")


if __name__ == "__main__":
    main()
