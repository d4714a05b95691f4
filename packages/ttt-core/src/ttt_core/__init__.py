"""ttt-core: Test-Time Training layers for PyTorch.

The stable API (semver): :func:`ttt_linear`, :func:`ttt_mlp`, the single-step entries
:func:`ttt_linear_step`, :func:`ttt_mlp_step`, :class:`TTTState`, :class:`TTTConfig`,
:class:`TTTLayer`, :class:`InnerLearner` (+ :class:`LinearLearner`, :class:`MLPLearner`) and
:func:`available_backends`.
"""

from .backends import Backend, available_backends, register_backend
from .config import TTTConfig
from .functional import ttt_linear, ttt_linear_step, ttt_mlp, ttt_mlp_step
from .layer import TTTLayer
from .learners import InnerLearner, LinearLearner, MLPLearner
from .state import TTTState

__all__ = [
    "Backend",
    "InnerLearner",
    "LinearLearner",
    "MLPLearner",
    "TTTConfig",
    "TTTLayer",
    "TTTState",
    "available_backends",
    "register_backend",
    "ttt_linear",
    "ttt_linear_step",
    "ttt_mlp",
    "ttt_mlp_step",
]
__version__ = "0.2.0"
