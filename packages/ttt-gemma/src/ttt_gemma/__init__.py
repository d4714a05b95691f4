"""ttt-gemma: Test-Time Training inside the pi0.5 Gemma action expert.

The action expert (:class:`ActionExpert`) is a Gemma decoder conditioned on the flow time through
AdaRMS; each chosen layer gets a non-causal TTT branch after attention (:class:`TTTBranch`),
``h = h + gate_ttt * TTT(AdaRMS_ttt(h))``, before the MLP block. :class:`FlowMatchingPolicy` adds
pi0.5's flow-matching head; :class:`StandInPrefixEncoder` stands in for PaliGemma's per-layer
keys/values and :class:`Pi05Policy` is the whole policy with PaliGemma's;
:mod:`ttt_gemma.checkpoint` loads openpi / lerobot pi0.5 weights; ``ttt-gemma train`` fine-tunes
on LeRobot v2 datasets (:mod:`ttt_gemma.train`), the whole policy from camera images, the task
prompt and the discretised state (:mod:`ttt_gemma.pi05_inputs`).
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
from .lerobot import read_lerobot, write_lerobot
from .paligemma import PaliGemmaPrefix, PaliGemmaPrefixConfig, Pi05Policy
from .pi05_inputs import IMAGE_SLOTS, Pi05Observations, pi05_observation
from .policy import FlowMatchingPolicy, sincos_time_embedding
from .prefix import PrefixKV, StandInPrefixEncoder
from .state_policy import StatePolicy

__all__ = [
    "IMAGE_SLOTS",
    "ActionExpert",
    "ActionExpertConfig",
    "AdaRMSNorm",
    "FlowMatchingPolicy",
    "GemmaBlock",
    "LoadReport",
    "PaliGemmaPrefix",
    "PaliGemmaPrefixConfig",
    "Pi05Observations",
    "Pi05Policy",
    "PrefixEncoderConfig",
    "PrefixKV",
    "StandInPrefixEncoder",
    "StatePolicy",
    "TTTBranch",
    "TTTOptions",
    "gated_residual",
    "joint_forward",
    "load_checkpoint",
    "load_pi05",
    "make_att_2d_masks",
    "pi05_attention_mask",
    "pi05_observation",
    "read_lerobot",
    "save_checkpoint",
    "save_pi05",
    "sincos_time_embedding",
    "write_lerobot",
]
__version__ = "0.1.0"
