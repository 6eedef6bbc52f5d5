"""Resolve `llama3.2-vision[:TAG]` from a local Ollama store ($OLLAMA_MODELS or ~/.ollama/models):
manifest -> blob digests -> file paths. Read-only: the store's files are never modified or moved.
Blobs are checked against their manifest digest (sha256) before use; a check is remembered, per
blob, size and modification time, in mllama's own cache folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ._native.errors import ModelLoadError
from .settings import cache_dir

MODEL_MEDIA = "application/vnd.ollama.image.model"
PROJECTOR_MEDIA = "application/vnd.ollama.image.projector"
DEFAULT_REGISTRY = "registry.ollama.ai"


def store_root() -> Path:
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env) if env else Path.home() / ".ollama" / "models"


_PART = re.compile(r"[A-Za-z0-9_.-]+")  # the characters Ollama's names take (types/model/name.go)
_HOST = re.compile(r"[A-Za-z0-9_.-]+(:[0-9]+)?")


def split_tag(reference: str) -> tuple[str, str]:
    """(name, tag): the tag follows the last ':' after the last '/' (a registry's port is part of the name:
    localhost:5000/me/model:tag); `latest` when none is given."""
    slash = reference.rfind("/")
    colon = reference.rfind(":")
    if colon > slash:
        return reference[:colon], reference[colon + 1:] or "latest"
    return reference, "latest"


def display_name(reference: str) -> str:
    """The name Ollama lists a model under: NAME:TAG, the tag `latest` when none is given."""
    name, tag = split_tag(reference)
    return f"{name}:{tag}"


def manifest_path(root: Path, reference: str) -> Path:
    name, tag = split_tag(reference)
    parts = name.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_REGISTRY, "library", parts[0]]
    elif len(parts) == 2:
        parts = [DEFAULT_REGISTRY, *parts]
    host_ok = len(parts) == 3 and _HOST.fullmatch(parts[0])  # (a host may name its port: Ollama's older names)
    if not host_ok or not all(_PART.fullmatch(p) for p in parts[1:] + [tag]) or any(p in (".", "..") for p in parts):
        raise ModelLoadError(f"invalid Ollama model name '{reference}'")
    return root.joinpath("manifests", *parts, tag)


def manifest_listing(manifest: Path) -> dict | None:
    """What Ollama's /api/tags says of a stored model, from its manifest: `digest`, the sha256 of the manifest's
    bytes; `size`, its layers' and config's bytes together; `mtime`, the manifest's modification time. None where
    the manifest cannot be read (since the model was loaded)."""
    try:
        data = manifest.read_bytes()
        parsed = json.loads(data)
        parts = [*parsed.get("layers", []), parsed.get("config")]
        size = sum(int(part.get("size", 0)) for part in parts if isinstance(part, dict))
        return {"digest": hashlib.sha256(data).hexdigest(), "size": size, "mtime": manifest.stat().st_mtime}
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _verified_cache() -> Path:
    return cache_dir() / "ollama_verified.json"


def _check_blob(path: Path, digest: str, size: int | None) -> None:
    if not path.is_file():
        raise ModelLoadError(f"the Ollama store lacks blob {digest} ({path})")
    st = path.stat()
    if size is not None and st.st_size != size:
        raise ModelLoadError(f"Ollama blob {digest} has {st.st_size} bytes, its manifest says {size}")
    stamp = f"{digest}:{st.st_size}:{st.st_mtime_ns}"
    cache = _verified_cache()
    try:
        known = json.loads(cache.read_text())
        known = {k for k in known if isinstance(k, str)} if isinstance(known, list) else set()
    except (OSError, ValueError):  # (a cache of ours: anything unexpected in it counts as empty)
        known = set()
    if stamp in known:
        return
    algo, _, expected = digest.partition(":")
    if algo != "sha256" or not expected:
        raise ModelLoadError(f"unsupported Ollama digest '{digest}'")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise ModelLoadError(f"Ollama blob {path.name} does not match its digest {digest} (corrupt or modified)")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(sorted(known | {stamp})))
    except OSError:
        pass


def resolve(reference: str, root: Path | None = None) -> tuple[Path, Path | None, Path]:
    """(model file, projector file or None, manifest) for an Ollama model reference like llama3.2-vision:11b."""
    root = root or store_root()
    path = manifest_path(root, reference)
    if not path.is_file():
        tags = sorted(p.name for p in path.parent.glob("*")) if path.parent.is_dir() else []
        hint = f" (tags present: {', '.join(tags)})" if tags else ""
        raise ModelLoadError(f"Ollama model '{reference}' not found in {root}{hint}")
    try:
        manifest = json.loads(path.read_text())
        layers = manifest["layers"]
        if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
            raise TypeError("'layers' is not a list of objects")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"unreadable Ollama manifest {path}: {exc}") from None
    files: dict[str, Path] = {}
    for layer in layers:
        media = layer.get("mediaType")
        if media not in (MODEL_MEDIA, PROJECTOR_MEDIA):
            continue
        digest = str(layer.get("digest", ""))
        blob = root / "blobs" / digest.replace(":", "-")
        _check_blob(blob, digest, layer.get("size"))
        files[media] = blob
    if MODEL_MEDIA not in files:
        raise ModelLoadError(f"Ollama manifest {path} has no model layer")
    return files[MODEL_MEDIA], files.get(PROJECTOR_MEDIA), path
