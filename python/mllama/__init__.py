"""mllama: Llama 3.2 Vision (architecture `mllama`) on ggml."""

from ._lib import (
    ConversionError,
    MllamaError,
    ModelLoadError,
    abi_version,
    devices,
    native_version,
    system_info,
)
from .convert import convert
from .chat_template import TemplateError
from .engine import ContextOverflowError
from .model import Model
from .sampling import SamplingParams
from .session import Chat
from .preprocess import ImageError, preprocess

__version__ = "0.1.0"

__all__ = [
    "Chat",
    "ContextOverflowError",
    "SamplingParams",
    "TemplateError",
    "ConversionError",
    "ImageError",
    "MllamaError",
    "Model",
    "ModelLoadError",
    "__version__",
    "abi_version",
    "convert",
    "devices",
    "native_version",
    "preprocess",
    "system_info",
]
