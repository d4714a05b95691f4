"""ttt-gemma: Test-Time Training inside the pi0.5 Gemma action expert.

The action expert (:class:`ActionExpert`) is a Gemma decoder conditioned on the flow time through
AdaRMS; each chosen layer gets a non-causal TTT branch after attention (:class:`TTTBranch`),
``h = h + gate_ttt * TTT(AdaRMS_ttt(h))``, before the MLP block. :class:`FlowMatchingPolicy` adds
pi0.5's flow-matching head; :class:`StandInPrefixEncoder` stands in for PaliGemma's per-layer
keys/values; :mod:`ttt_gemma.checkpoint` loads openpi / lerobot pi0.5 weights.
"""

from .adarms import AdaRMSNorm, gated_residual
from .attention import make_att_2d_masks, pi05_attention_mask
from .checkpoint import (
    LoadReport,
    load_checkpoint,
    load_pi05,
    save_checkpoint,
    save_pi05,
)
from .config import ActionExpertConfig, PrefixEncoderConfig, TTTOptions
from .expert import ActionExpert
from .joint import joint_forward
from .layer import GemmaBlock, TTTBranch
from .policy import FlowMatchingPolicy, sincos_time_embedding
from .prefix import PrefixKV, StandInPrefixEncoder

__all__ = [
    "ActionExpert",
    "ActionExpertConfig",
    "AdaRMSNorm",
    "FlowMatchingPolicy",
    "GemmaBlock",
    "LoadReport",
    "PrefixEncoderConfig",
    "PrefixKV",
    "StandInPrefixEncoder",
    "TTTBranch",
    "TTTOptions",
    "gated_residual",
    "joint_forward",
    "load_checkpoint",
    "load_pi05",
    "make_att_2d_masks",
    "pi05_attention_mask",
    "save_checkpoint",
    "save_pi05",
    "sincos_time_embedding",
]
__version__ = "0.1.0"
