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
from .model import Model
from .preprocess import ImageError, preprocess

__version__ = "0.1.0"

__all__ = [
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
