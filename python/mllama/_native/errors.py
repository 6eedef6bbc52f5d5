"""Every exception mllama raises, in one place. All derive from MllamaError; the ones a caller can
fix by changing its input also derive from ValueError."""

from __future__ import annotations


class MllamaError(RuntimeError):
    """Base class of every error raised by mllama; `status` is the C status name."""

    def __init__(self, message: str, status: str = "error"):
        super().__init__(message)
        self.status = status


class ModelLoadError(MllamaError):
    """A model file could not be loaded: missing, truncated, not mllama, a bad tensor, ..."""


class ConversionError(MllamaError):
    """A Hugging Face checkpoint could not be converted."""


class ModelClosedError(MllamaError):
    """The model was used after close()."""


class ImageError(MllamaError, ValueError):
    """An image could not be read or converted (corrupt, truncated, unsupported, too large)."""


class ContextOverflowError(MllamaError, ValueError):
    """The prompt (plus what must be generated) does not fit in the context; `limit` says which of its limits:
    "tokens" (n_ctx) or "image_slots" (more images than n_image_slots)."""

    def __init__(self, message: str, status: str = "error", limit: str = "tokens"):
        super().__init__(message, status)
        self.limit = limit


class TemplateError(MllamaError, ValueError):
    """The chat template rejected the conversation (e.g. images together with a system prompt)."""


class GenerationCancelled(MllamaError):
    """A request stopped by its caller (a closed stream, a client that went away)."""


__all__ = ["ConversionError", "ContextOverflowError", "GenerationCancelled", "ImageError", "MllamaError",
           "ModelClosedError", "ModelLoadError", "TemplateError"]
