"""mllama: Llama 3.2 Vision (architecture `mllama`) on ggml."""

from ._native.errors import (
    ContextOverflowError,
    ConversionError,
    GenerationCancelled,
    ImageError,
    MllamaError,
    ModelClosedError,
    ModelLoadError,
    TemplateError,
)
from ._native.system import abi_version, devices, native_version, system_info
from ._version import __version__
from .convert import convert
from .generation.constrain import Grammar
from .generation.results import GenerationResult, TextStream, Timings, Usage
from .generation.sampling import SamplingParams
from .generation.session import Chat
from .hparams import HParams
from .image.preprocess import preprocess
from .model import Model

__all__ = [
    "Chat",
    "ContextOverflowError",
    "ConversionError",
    "GenerationCancelled",
    "GenerationResult",
    "Grammar",
    "HParams",
    "ImageError",
    "MllamaError",
    "Model",
    "ModelClosedError",
    "ModelLoadError",
    "SamplingParams",
    "TemplateError",
    "TextStream",
    "Timings",
    "Usage",
    "__version__",
    "abi_version",
    "convert",
    "devices",
    "native_version",
    "preprocess",
    "system_info",
]
