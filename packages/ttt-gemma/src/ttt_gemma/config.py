"""Configuration of the pi0.5 action expert and of the TTT branch inside it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

LAYER_TYPES = ("linear", "mlp")
GATINGS = ("adarms", "tanh_alpha", "both")
# the gemma_300m preset's TTT branch: 8 heads of 64 (width 512) instead of the full 8 x 128
GEMMA_300M_TTT = {"num_heads": 8, "head_dim": 64}


@dataclass
class TTTOptions:
    """Options of the TTT branch (inserted after attention, before the MLP block).

    The branch computes ``h = h + gate_ttt * TTT(AdaRMS_ttt(h, cond))``; TTT is non-causal over the
    action chunk (``mini_batch_size=None``: the whole chunk is one mini-batch), uses no positions.
    """

    layer_positions: str | Sequence[int] = "all"  # "all" or layer indices that get a TTT branch
    layer_type: str = "linear"  # fast model: "linear" | "mlp"
    use_dual_form: bool = True  # False -> primal form (same math), for comparison
    base_lr: float = 1.0  # eta = base_lr * sigmoid(x W_lr + b_lr) / head_dim
    gating: str = "adarms"  # "adarms" (gate from the branch's AdaRMS dense, zero-init -> 0)
    # | "tanh_alpha" (static per-dimension tanh(alpha)) | "both"
    gate_init: float = 0.1  # alpha init of the "tanh_alpha" gate (0.0 -> branch output exactly 0)
    num_heads: int | None = None  # TTT heads; None -> the expert's attention heads
    head_dim: int | None = None  # TTT head dim; None -> width // num_heads (the full width)
    # (the gemma_300m preset sets 8 heads of 64: TTT width 512, see GEMMA_300M_TTT)
    mlp_ratio: int = 4  # hidden of the "mlp" fast model = mlp_ratio * head_dim
    qk_l2_norm: bool = False  # L2-normalise q and k of the inner learner
    normalize_target: bool = False  # normalise the reconstruction target v - k
    bidirectional: bool = False  # extra pass over the reversed chunk (same params, own gate)
    zero_init_adarms: bool = True  # zero weight and bias of the branch's AdaRMS dense (exact start)


@dataclass
class ActionExpertConfig:
    """The Gemma action expert of pi0.5 (defaults: the ``gemma_300m`` variant) and its policy head.

    Attention is multi-query (``num_kv_heads`` = 1 in pi0.5) with RoPE; each layer is
    ``h = h + g_a * Attn(AdaRMS(h)); [TTT branch]; h = h + g_m * MLP(AdaRMS(h))`` where the AdaRMS
    norm returns ``rms_norm(h) * (1 + scale) + shift`` and the gate ``g``, all three from a dense
    layer of the time condition.
    """

    width: int = 1024  # hidden size of the expert
    depth: int = 18  # decoder layers
    mlp_dim: int = 4096  # GeGLU hidden size
    num_heads: int = 8  # query heads
    num_kv_heads: int = 1  # key/value heads (multi-query)
    head_dim: int = 256  # attention head dim
    action_dim: int = 32  # padded action dimension
    action_horizon: int = 50  # actions per chunk
    use_adarms: bool = True  # pi0.5: time enters through AdaRMS; False: pi0-style (plain RMSNorm)
    rms_eps: float = 1e-6
    rope_theta: float = 10_000.0
    min_period: float = 4e-3  # sin-cos time embedding periods
    max_period: float = 4.0
    time_beta: tuple[float, float] = (1.5, 1.0)  # t ~ Beta(a, b) * 0.999 + 0.001 during training
    num_sample_steps: int = 10  # Euler steps from t=1 to t=0
    use_ttt: bool = False  # add TTT branches (see `ttt`)
    ttt: TTTOptions = field(default_factory=TTTOptions)

    def __post_init__(self) -> None:
        for name in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ActionExpertConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if isinstance(self.ttt, dict):
            self.ttt = TTTOptions(**self.ttt)
        if not isinstance(self.ttt, TTTOptions):
            raise TypeError(f"ttt must be a TTTOptions, got {type(self.ttt).__name__}")
        t = self.ttt
        if t.layer_type not in LAYER_TYPES:
            raise ValueError(f"ttt.layer_type must be one of {LAYER_TYPES}, got {t.layer_type!r}")
        if t.gating not in GATINGS:
            raise ValueError(f"ttt.gating must be one of {GATINGS}, got {t.gating!r}")
        if self.use_ttt and t.gating in ("adarms", "both") and not self.use_adarms:
            raise ValueError(
                f"ttt.gating={t.gating!r} needs use_adarms=True; use gating='tanh_alpha' for an "
                "expert without AdaRMS"
            )
        self.ttt_layers()  # validates layer_positions
        heads = t.num_heads or self.num_heads
        if t.head_dim is None and self.width % heads:
            raise ValueError(f"width ({self.width}) must be divisible by ttt.num_heads ({heads})")

    def ttt_layers(self) -> tuple[int, ...]:
        """Indices of the layers that get a TTT branch (empty when ``use_ttt`` is False)."""
        pos = self.ttt.layer_positions
        if isinstance(pos, str):
            if pos != "all":
                raise ValueError(
                    f"ttt.layer_positions must be 'all' or a list of ints, got {pos!r}"
                )
            layers = tuple(range(self.depth))
        else:
            layers = tuple(pos)
            for i in layers:
                if not isinstance(i, int) or isinstance(i, bool):
                    raise TypeError(f"ttt.layer_positions must hold ints, got {i!r}")
                if not 0 <= i < self.depth:
                    raise ValueError(
                        f"ttt.layer_positions: layer index {i} out of range for depth {self.depth}"
                    )
            if len(set(layers)) != len(layers):
                raise ValueError(f"ttt.layer_positions has duplicates: {list(layers)}")
        return layers if self.use_ttt else ()

    def replace(self, **changes) -> ActionExpertConfig:
        """A copy with fields changed (``ttt`` may be a dict of TTTOptions changes)."""
        ttt = changes.pop("ttt", None)
        if isinstance(ttt, dict):
            changes["ttt"] = dataclasses.replace(self.ttt, **ttt)
        elif ttt is not None:
            changes["ttt"] = ttt
        return dataclasses.replace(self, **changes)

    @classmethod
    def gemma_300m(cls, **changes) -> ActionExpertConfig:
        """pi0.5's action expert: width 1024, depth 18, MLP 4096, 8 heads, 1 KV head, head dim 256.

        Its TTT branches (``use_ttt=True``) default to ``GEMMA_300M_TTT``: 8 heads of 64 (TTT
        width 512, half the expert's), so that TTT in all 18 layers adds about +18% to a CPU
        training step instead of about +30% at full width (``benchmarks/gemma.py``). The inner
        update over the 50-token chunk is a sum of 50 rank-one terms, so a 64 x 64 fast weight
        per head has room for all of it. ``ttt=dict(...)`` changes these defaults (e.g.
        ``ttt=dict(head_dim=128)`` for the full width); a ``TTTOptions`` replaces them.
        """
        ttt = changes.pop("ttt", None)
        if ttt is None or isinstance(ttt, dict):
            ttt = dataclasses.replace(TTTOptions(), **{**GEMMA_300M_TTT, **(ttt or {})})
        return cls(ttt=ttt, **changes)

    @classmethod
    def tiny(cls, **changes) -> ActionExpertConfig:
        """A small expert for tests and demos (same structure, seconds on a CPU)."""
        base = dict(
            width=64,
            depth=2,
            mlp_dim=128,
            num_heads=4,
            num_kv_heads=1,
            head_dim=16,
            action_dim=4,
            action_horizon=16,
        )
        base.update(changes)
        return cls(**base)


@dataclass
class PrefixEncoderConfig:
    """The small stand-in for the PaliGemma prefix (bidirectional Gemma layers on feature tokens).

    Its per-layer keys/values feed the expert, so ``depth``, ``num_kv_heads`` and ``head_dim`` must
    match the expert's.
    """

    feature_dim: int = 16  # input feature size of one prefix token
    width: int = 64  # hidden size (PaliGemma: 2048)
    depth: int = 2
    mlp_dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 16
    rms_eps: float = 1e-6
    rope_theta: float = 10_000.0

    @classmethod
    def for_expert(cls, expert: ActionExpertConfig, **changes) -> PrefixEncoderConfig:
        """A stand-in encoder whose per-layer keys/values fit ``expert``."""
        base = dict(
            depth=expert.depth,
            num_kv_heads=expert.num_kv_heads,
            head_dim=expert.head_dim,
            num_heads=expert.num_heads,
        )
        base.update(changes)
        return cls(**base)
