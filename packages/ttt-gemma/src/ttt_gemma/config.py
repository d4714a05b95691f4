"""Configuration of the pi0.5 action expert and of the TTT branch inside it."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from ttt_core import TTTConfig
from ttt_core.typed_config import config_from_dict

INPUTS = ("residual", "attn_output")
GATINGS = ("adarms", "tanh_alpha", "both")
# the gemma_300m preset's TTT layer: 8 heads of 64 (width 512) instead of the full 8 x 128
GEMMA_300M_TTT = {"num_heads": 8, "head_dim": 64}
# gemma's defaults for the nested TTTConfig: the whole action chunk is one non-causal mini-batch
LAYER_DEFAULTS = {"mini_batch_size": None, "causal": False}
# TTTOptions fields of ttt-gemma 0.1 that now live in the nested TTTConfig (old -> new spelling)
MOVED_TO_LAYER = {
    "layer_type": "layer.inner",
    **{name: f"layer.{name}" for name in ("use_dual_form", "base_lr", "gate_init", "num_heads",
       "head_dim", "mlp_ratio", "qk_l2_norm", "normalize_target", "bidirectional")},
}  # fmt: skip


def _layer_gate(gating: str) -> str:
    """The TTT layer's own gate (``TTTConfig.gate``) that a gemma ``gating`` asks for."""
    return "tanh_alpha" if gating in ("tanh_alpha", "both") else "none"


@dataclass
class TTTOptions:
    """Where and how the action expert gets TTT; the TTT layer itself is a nested ``TTTConfig``.

    ``input="residual"`` (default): ``h = h + g_t * TTT(AdaRMS_ttt(h))`` on the residual stream after
    attention. ``input="attn_output"`` (the pi0.5 integration notes): TTT on the attention output
    before the attention residual, ``a = o_proj(attn); a = a + g_t * TTT(AdaRMS_ttt(a));
    h = h + g_a * a``. Either way the branch has its own AdaRMS, whose zero-initialised dense makes
    ``g_t = 0`` at the start (exactly the expert without TTT).

    ``layer`` is ttt-core's :class:`~ttt_core.TTTConfig`, or a dict of changes to gemma's defaults
    (``hidden_size`` = the expert's width, ``num_heads`` = its heads, ``mini_batch_size=None`` and
    ``causal=False``: the whole chunk is one non-causal mini-batch, no positions). Its ``gate`` follows
    ``gating``. :meth:`ActionExpertConfig.ttt_layer_config` gives the resolved ``TTTConfig``.
    """

    layer_positions: str | tuple[int, ...] = "all"  # "all" or layer indices that get a TTT branch
    input: str = "residual"  # what the branch reads: "residual" | "attn_output" (see above)
    gating: str = "adarms"  # "adarms" (the branch's AdaRMS gate, zero-init -> 0)
    # | "tanh_alpha" (the layer's static per-dimension tanh(alpha), TTTConfig.gate) | "both"
    zero_init_adarms: bool = True  # zero weight and bias of the branch's AdaRMS dense (exact start)
    layer: TTTConfig | dict = field(default_factory=dict)  # the TTT layer (see above)

    def layer_config(self, width: int, num_heads: int) -> TTTConfig:
        """The TTT layer's full ``TTTConfig`` in an expert of this width and number of heads."""
        if self.input not in INPUTS:
            raise ValueError(f"ttt.input must be one of {INPUTS}, got {self.input!r}")
        if self.gating not in GATINGS:
            raise ValueError(f"ttt.gating must be one of {GATINGS}, got {self.gating!r}")
        gate = _layer_gate(self.gating)
        layer = self.layer
        if isinstance(layer, dict):
            for key in ("hidden_size", "gate"):
                if key in layer:
                    owner = "width" if key == "hidden_size" else "ttt.gating"
                    raise ValueError(f"ttt.layer.{key} is set by the expert's {owner}; remove it")
            full = {"hidden_size": width, "num_heads": num_heads, "gate": gate, **LAYER_DEFAULTS}
            layer = config_from_dict(TTTConfig, {**full, **layer}, prefix="ttt.layer")  # typed
        elif not isinstance(layer, TTTConfig):
            raise TypeError(f"ttt.layer must be a TTTConfig or a dict, got {type(layer).__name__}")
        if layer.hidden_size != width:
            raise ValueError(
                f"ttt.layer.hidden_size ({layer.hidden_size}) must equal the expert's width ({width})"
            )
        if layer.gate != gate:
            raise ValueError(
                f"ttt.layer.gate={layer.gate!r} contradicts ttt.gating={self.gating!r} "
                f"(which needs gate={gate!r}); choose the gate with ttt.gating"
            )
        return layer


def _reject_moved_fields(init):
    """Wrap TTTOptions' generated __init__: a 0.1 field name gets a TypeError with its new spelling."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        moved = [k for k in kwargs if k in MOVED_TO_LAYER]
        if moved:
            hints = ", ".join(f"ttt.{k} -> ttt.{MOVED_TO_LAYER[k]}" for k in moved)
            raise TypeError(
                f"TTTOptions: {moved} moved into the nested ttt_core.TTTConfig ({hints}); e.g. "
                "TTTOptions(layer=dict(inner='mlp', head_dim=64)) or in YAML 'ttt: {layer: {...}}'"
            )
        init(self, *args, **kwargs)

    return wrapper


TTTOptions.__init__ = _reject_moved_fields(TTTOptions.__init__)


def _merge_ttt(options: TTTOptions, changes: dict) -> TTTOptions:
    """``options`` with ``changes`` applied; a ``layer`` dict updates a ``layer`` dict."""
    changes = dict(changes)
    if isinstance(changes.get("layer"), dict) and isinstance(options.layer, dict):
        changes["layer"] = {**options.layer, **changes["layer"]}
    return TTTOptions(**{**{f.name: getattr(options, f.name) for f in dataclasses.fields(options)},
                         **changes})  # fmt: skip


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
        self.ttt_layer_config()  # validates the options and the nested TTTConfig
        if self.use_ttt and self.ttt.gating in ("adarms", "both") and not self.use_adarms:
            raise ValueError(
                f"ttt.gating={self.ttt.gating!r} needs use_adarms=True; use gating='tanh_alpha' "
                "for an expert without AdaRMS"
            )
        self.ttt_layers()  # validates layer_positions

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

    def ttt_layer_config(self) -> TTTConfig:
        """The ``TTTConfig`` of every TTT branch (``ttt.layer`` resolved against this expert)."""
        return self.ttt.layer_config(self.width, self.num_heads)

    def replace(self, **changes) -> ActionExpertConfig:
        """A copy with fields changed; ``ttt`` may be a dict of TTTOptions changes, whose ``layer``
        dict is merged into the current ``ttt.layer`` dict."""
        ttt = changes.pop("ttt", None)
        if isinstance(ttt, dict):
            changes["ttt"] = _merge_ttt(self.ttt, ttt)
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
        ``ttt=dict(layer=dict(head_dim=128))`` for the full width); a ``TTTOptions`` replaces
        them.
        """
        ttt = changes.pop("ttt", None)
        if ttt is None or isinstance(ttt, dict):
            ttt = _merge_ttt(TTTOptions(layer=dict(GEMMA_300M_TTT)), ttt or {})
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
