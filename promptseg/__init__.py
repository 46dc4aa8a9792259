"""promptseg: prompt-conditioned image segmentation models behind one interface."""

from .compare import Comparison, compare
from .errors import (
    CheckpointFormatError,
    ChecksumError,
    PromptsegError,
    UnknownModelError,
    UnsupportedPromptError,
    WeightsNotFoundError,
)
from .predictor import Predictor
from .prompts import MixedPrompt, SupportSet, TextPrompt, VisualPrompt, Vocabulary, as_prompt
from .result import SegmentationResult
from .zoo import ModelCard, create_model, list_models, model_info

__version__ = "0.1.0"

__all__ = [
    "CheckpointFormatError",
    "ChecksumError",
    "Comparison",
    "MixedPrompt",
    "ModelCard",
    "Predictor",
    "PromptsegError",
    "SegmentationResult",
    "SupportSet",
    "TextPrompt",
    "UnknownModelError",
    "UnsupportedPromptError",
    "VisualPrompt",
    "Vocabulary",
    "WeightsNotFoundError",
    "as_prompt",
    "compare",
    "create_model",
    "list_models",
    "model_info",
]
