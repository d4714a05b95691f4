"""`TTTStreamingTransformerLayer`: Moshi's transformer layer with a TTT block after self-attention.

One layer computes, for x [B, T, C]::

    x = x + attn(norm1(x))                  # Moshi's self-attention (local window, KV ring cache)
    x = x + tanh(alpha) * TTT(norm_ttt(x))  # causal TTT, mini-batch b, gate inside the TTTLayer
    x = x + ffn(norm2(x))                   # Moshi's feed-forward / gating

The TTT block keeps per-sample fast weights W (e.g. TTT-Linear: W1 [B, H, D, D], b1 [B, H, 1, D])
that are trained while the layer reads: every token j adds the inner loss
``l_j(W) = 0.5 * ||LN_h(f_W(k_j)) - (v_j - k_j)||^2`` and every query of a mini-batch reads the
weights updated by the tokens of that mini-batch up to itself (ttt-core's causal semantics).

The class subclasses moshi's `StreamingTransformerLayer`, so FSDP auto-wrapping by layer class
(`_fsdp_final`) and Moshi's streaming machinery (`lm.streaming(B)`, `LMGen`, `reset_streaming`) keep
working. In streaming mode the fast weights *and the partial mini-batch* (gradient sums of the
tokens read since the last mini-batch boundary) live in the layer's streaming state
(`_TTTLayerState.ttt_state`, a ttt-core `TTTState`), so feeding tokens one by one gives the same
outputs as one forward pass over the whole sequence.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from moshi.modules.transformer import RMSNorm, StreamingTransformerLayer, _LayerState
from moshi.utils.compile import no_compile
from torch import Tensor, nn

from ttt_core import TTTConfig, TTTLayer, TTTState

__all__ = ["TTTRMSNorm", "TTTStreamingTransformerLayer", "convert_layer", "revert_layer"]


@dataclass
class _TTTLayerState(_LayerState):
    """Moshi's per-layer streaming state plus the TTT fast weights.

    Attributes:
        ttt_state: the TTT layer's `TTTState` after the last token read, ``None`` before the first
            token (the layer then starts from its learned initial fast weights).
        pending_reset: ``[B]`` bool, samples to restart from the initial fast weights at the next
            call (a partial `reset_streaming(mask)`), or ``None``.
    """

    ttt_state: TTTState | None = None
    pending_reset: Tensor | None = None

    def reset(self, reset_mask: Tensor) -> None:
        super().reset(reset_mask)
        if self.ttt_state is None:
            return
        if bool(reset_mask.all()):  # one host sync, only on resets
            self.ttt_state = None
            self.pending_reset = None
            return
        if self.ttt_state.offset != 0:
            raise ValueError(
                "reset_streaming(reset_mask) with a partial mask is only supported at a TTT "
                f"mini-batch boundary (the state has read {self.ttt_state.offset} tokens of the "
                "current mini-batch, which all samples share); reset every sample instead"
            )
        mask = reset_mask.to(torch.bool)
        self.pending_reset = mask if self.pending_reset is None else self.pending_reset | mask

    def set_exec_mask(self, exec_mask: Tensor) -> None:
        if not bool(exec_mask.all()):
            raise ValueError(
                "exec_mask with False entries (desynchronised batch items) is not supported by TTT "
                "layers: the samples of a batch share the position inside a TTT mini-batch"
            )
        super().set_exec_mask(exec_mask)


# The streaming TTT state advances in Python (a new `TTTState` per call, its mini-batch offset a
# Python int), so a CUDA graph captured over a step would replay the captured token's update for
# every later token. Moshi's `LMGen` captures its step on CUDA unless told not to.
_NO_GRAPH_CAPTURE = (
    "a TTT layer's streaming step cannot be captured in a CUDA graph (its fast-weight state "
    "advances outside the graph); run Moshi's LMGen with CUDA graphs off: "
    "`with moshi.utils.compile.no_cuda_graph(): ...` or the environment variable NO_CUDA_GRAPH=1"
)


class TTTRMSNorm(RMSNorm):
    """Moshi's `RMSNorm` (same parameter ``alpha`` [1, 1, C], same result) in fewer ops.

    ``y = x * (alpha * rsqrt(mean(x * x) + eps))``. Moshi's version adds ``x**2`` and three
    ``.to`` casts; in a streaming step every op runs cache-cold (the layer's weights stream through
    the caches between two tokens): one token [1, 1, 1024] with flushed caches took ~300 us here
    against ~420 us for Moshi's. Inputs whose dtype differs from the norm's compute dtype take
    Moshi's path.
    """

    def _takes_moshis_path(self, x: Tensor) -> bool:
        """x's dtype differs from the norm's compute dtype (Moshi's casts then apply)."""
        return x.dtype != self.alpha.dtype or (self.dtype is not None and self.dtype != x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self._takes_moshis_path(x):
            return super().forward(x)
        if x.dim() != 3:
            raise ValueError(f"RMSNorm expects x [B, T, C], got {list(x.shape)}")
        a = self.alpha
        return x * (a * torch.rsqrt(torch.mean(x * x, dim=2, keepdim=True) + self.eps))

    def rms_norm_params(self, x: Tensor) -> tuple[Tensor, float] | None:
        """(weight ``alpha`` [1, 1, C], eps) of this norm for x, for a fused step that computes it
        itself (ttt-core's ``TTTLayer.forward(pre_norm=...)``); None when x takes Moshi's path."""
        return None if self._takes_moshis_path(x) else (self.alpha, float(self.eps))


def _fresh_norm(norm: nn.Module) -> nn.Module:
    """A copy of a Moshi norm module (RMSNorm / LayerNorm) with scale 1 and bias 0 (an RMSNorm
    becomes the equivalent `TTTRMSNorm`)."""
    new = copy.deepcopy(norm)
    if type(new) is RMSNorm:
        new.__class__ = TTTRMSNorm
    with torch.no_grad():
        for name, p in new.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return new


class TTTStreamingTransformerLayer(StreamingTransformerLayer):
    """A Moshi `StreamingTransformerLayer` with a causal TTT block between attention and FFN.

    Build one with `convert_layer(layer, config)` (or `ttt_moshi.patch_lm` for a whole model): it
    turns an existing layer into this class in place, keeping every Moshi weight. It adds

    - ``norm_ttt``: a pre-norm of the same kind as ``norm1`` (scale 1, bias 0),
    - ``ttt``: a ttt-core `TTTLayer` [B, T, C] -> [B, T, C] with its own output gate
      (``TTTConfig(gate="tanh_alpha", gate_init=0.0)`` makes the block exactly zero at the start).

    Args of forward:
        x: [B, T, C] the layer input; cross_attention_src as in Moshi.

    Returns:
        [B, T, C].
    """

    ttt: TTTLayer
    norm_ttt: nn.Module
    ttt_config: TTTConfig

    def _init_ttt(self, config: TTTConfig) -> None:
        ref = self.norm2
        param = next(self.parameters())
        self.ttt_config = config
        self.norm_ttt = _fresh_norm(ref)
        self.ttt = TTTLayer(config).to(device=param.device, dtype=param.dtype)

    def _init_streaming_state(self, batch_size: int) -> _TTTLayerState:
        device = next(iter(self.parameters())).device
        return _TTTLayerState(batch_size, device, offset_cpu=0)

    def _start_ttt_state(self, state: _TTTLayerState) -> TTTState | None:
        """The TTT state to resume from, after applying a pending partial reset."""
        current = state.ttt_state
        if state.pending_reset is None or current is None:
            state.pending_reset = None
            return current
        mask = state.pending_reset.to(current.params[next(iter(current.params))].device)
        fresh = self.ttt.inner.init_state(current.batch_size)  # fast weights at their learned init
        state.pending_reset = None

        def _merge(old: dict[str, Tensor] | None, new: dict[str, Tensor] | None):
            if old is None:
                return None
            out = {}
            for name, t in old.items():
                start = new[name] if new is not None else torch.zeros_like(t)
                m = mask.view(-1, *([1] * (t.dim() - 1)))
                out[name] = torch.where(m, start.to(t), t)
            return out

        return TTTState(
            params=_merge(current.params, fresh.params),
            offset=current.offset,
            mini_batch_size=current.mini_batch_size,
            grad_sum=current.grad_sum,  # None at a boundary (checked in reset)
            momentum=_merge(current.momentum, None),
            current=current.current,
        )

    def _ttt_block(self, x: Tensor) -> Tensor:
        """x [B, T, C] -> x + gate * TTT(norm_ttt(x)), carrying the fast weights when streaming.

        Streaming, the norm and the residual are handed to the TTT layer (``pre_norm``,
        ``residual``: the same ops on its ordinary road), so that a fused single-token step
        includes them; a whole sequence applies them here (the TTT layer's input and output are
        then the block's, as `memory_probe`'s hooks read them)."""
        state = self._streaming_state
        if state is None:
            y, _ = self.ttt(self.norm_ttt(x))  # (B, T, C)
            return x.to(y) + y
        assert isinstance(state, _TTTLayerState)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(_NO_GRAPH_CAPTURE)
        y, state.ttt_state = self.ttt(x, state=self._start_ttt_state(state),
                                      pre_norm=self.norm_ttt, residual=True)  # fmt: skip
        return y

    def forward(self, x: Tensor, cross_attention_src: Tensor | None = None) -> Tensor:
        with ExitStack() as stack:
            if x.device.type != "cuda":
                stack.enter_context(no_compile())
            x = self._sa_block(x)
            if self.cross_attention is not None:
                if cross_attention_src is None:
                    raise ValueError("cross_attention_src is required by a cross-attention layer")
                x = self._cross_attention_block(x, cross_attention_src)
            elif cross_attention_src is not None:
                raise ValueError("cross_attention_src given to a layer without cross-attention")
            x = self._ttt_block(x)
            x = self._ff_block(x)
            state = self._streaming_state
            if state:
                state.offset_cpu += x.shape[1]
            return x


def convert_layer(
    layer: StreamingTransformerLayer, config: TTTConfig
) -> TTTStreamingTransformerLayer:
    """Turn a Moshi layer into a `TTTStreamingTransformerLayer` in place (weights kept).

    Args:
        layer: a `StreamingTransformerLayer` that is not streaming and not converted yet.
        config: the TTT block's config; ``config.hidden_size`` must equal the layer width.

    Returns:
        the same object, now of class `TTTStreamingTransformerLayer`.
    """
    if not isinstance(layer, StreamingTransformerLayer):
        raise TypeError(f"layer must be a moshi StreamingTransformerLayer, got {type(layer)}")
    if isinstance(layer, TTTStreamingTransformerLayer):
        raise ValueError("layer is already a TTTStreamingTransformerLayer")
    if type(layer) is not StreamingTransformerLayer:
        raise TypeError(f"only plain StreamingTransformerLayer can be converted, got {type(layer)}")
    if layer.is_streaming:
        raise ValueError("layer is streaming: convert it outside of `with lm.streaming(...)`")
    if not isinstance(config, TTTConfig):
        raise TypeError(f"config must be a ttt_core.TTTConfig, got {type(config)}")
    d_model = _layer_width(layer)
    if config.hidden_size != d_model:
        raise ValueError(
            f"config.hidden_size={config.hidden_size} must equal the layer width {d_model}"
        )
    if not config.causal:
        raise ValueError("config.causal must be True: Moshi's transformer is causal and streams")
    layer.__class__ = TTTStreamingTransformerLayer
    assert isinstance(layer, TTTStreamingTransformerLayer)
    layer._init_ttt(config)
    return layer


def revert_layer(layer: TTTStreamingTransformerLayer) -> StreamingTransformerLayer:
    """Strip the TTT block: the layer is a plain Moshi `StreamingTransformerLayer` again."""
    if not isinstance(layer, TTTStreamingTransformerLayer):
        raise TypeError(f"layer must be a TTTStreamingTransformerLayer, got {type(layer)}")
    if layer.is_streaming:
        raise ValueError("layer is streaming: revert it outside of `with lm.streaming(...)`")
    del layer.ttt
    del layer.norm_ttt
    del layer.ttt_config
    layer.__class__ = StreamingTransformerLayer
    return layer


def _layer_width(layer: StreamingTransformerLayer) -> int:
    if hasattr(layer, "self_attn"):
        return int(layer.self_attn.embed_dim)
    for p in layer.norm2.parameters():
        return int(p.shape[-1])
    raise ValueError("cannot infer the width of the layer")
