"""The package version (one place; the C library reports the same string through mllama_version)."""

__version__ = "0.1.0"
