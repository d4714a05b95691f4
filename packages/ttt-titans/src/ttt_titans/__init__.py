"""ttt-titans: a Titans-style continual forecaster on ttt-core.

Parts: ``Backbone`` (LSTM / Transformer / Titans sliding-window attention), ``NeuralMemory``
(chunk-parallel fast-weight memory, ttt-core's Titans form), ``MetaLearner`` (per-step write
rates), combined in ``ContinualForecaster``; ``Runner`` runs the pretrain + online protocol.
"""

from .backbones import (
    Backbone,
    LSTMBackbone,
    TitansBackbone,
    TransformerBackbone,
    build_backbone,
)
from .config import ExperimentConfig, load_config
from .data import Series, WindowDataset, load_embedded, load_ett_csv, make_splits
from .memory import NeuralMemory
from .meta import MetaLearner
from .model import ContinualForecaster
from .train import Runner

__all__ = [
    "Backbone",
    "ContinualForecaster",
    "ExperimentConfig",
    "LSTMBackbone",
    "MetaLearner",
    "NeuralMemory",
    "Runner",
    "Series",
    "TitansBackbone",
    "TransformerBackbone",
    "WindowDataset",
    "build_backbone",
    "load_config",
    "load_embedded",
    "load_ett_csv",
    "make_splits",
]
__version__ = "0.1.0"
