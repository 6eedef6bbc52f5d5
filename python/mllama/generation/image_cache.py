"""Vision results cached by image content, so that an image seen before (in another request, another
Model, another process) skips the vision tower: what encoding an image leaves in an image slot (its
cross-attention K/V, mllama_context_get_slot_state) is kept as a blob, in memory (a least-recently-used
map under a byte budget) and optionally in a directory (one file per image, written atomically).

The key of an entry is a SHA-256 over
- this cache's format version (FORMAT_VERSION), so a change of format makes every old entry a miss;
- the model's identity (model_identity): each model file's resolved path, size, mtime (ns), device and
  inode, with the hyperparameters, the slots' layout (the blob format's version, K/V type, dims) and
  the path each op family takes (device, CPU kernels; a blob then gives the bits this configuration
  computes). Why not a hash of the GGUF header and tensor table: two checkpoints of the same
  architecture (a fine-tune) convert to the same header, so it does not change when the weights do;
  hashing the weights themselves would, but costs seconds per load (1.8 GB of vision tower at 11B).
  Rewriting a file, in place or by rename, changes its mtime; a copy elsewhere is a miss, never a wrong hit;
- the image after preprocessing (PreparedImage.key: a hash of the pixel values and aspect ratio id,
  which covers both the image bytes and the preprocessing).

A disk file is `<key>.mlslot`: a header (magic, FORMAT_VERSION, the key, the blob's SHA-256 and
length) and the blob. A file that is truncated, corrupt, or made for another key or layout is
ignored (a miss) and replaced by the next store; nothing is written outside the directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import struct
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

from .._native.slot_state import get_slot_state, set_slot_state

FORMAT_VERSION = 1
SUFFIX = ".mlslot"
DEFAULT_IMAGES = 4  # the default memory budget holds at least this many of the largest images
_MAGIC = b"MLLAMAIC"
_HEADER = struct.Struct("<8sI32s32sQ")  # magic, format version, key, SHA-256 of the blob, blob bytes

log = logging.getLogger("mllama.image_cache")


def model_identity(paths: Iterable[os.PathLike | str], *parts: Any) -> str:
    """A hex digest that changes when any model file is rewritten or any of `parts` (hparams, slot
    layout, op paths: dataclasses, dicts or plain values) differs."""
    digest = hashlib.sha256(f"mllama image cache {FORMAT_VERSION}\n".encode())
    for path in paths:
        st = os.stat(path)
        digest.update(os.fsencode(os.path.realpath(path)))  # (a name that is not UTF-8: its bytes, as the OS has it)
        digest.update(f"|{st.st_size}|{st.st_mtime_ns}|{st.st_dev}|{st.st_ino}\n".encode())
    for part in parts:
        value = dataclasses.asdict(part) if dataclasses.is_dataclass(part) else part
        digest.update(repr(sorted(value.items()) if isinstance(value, dict) else value).encode() + b"\n")
    return digest.hexdigest()


@dataclasses.dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0      # blobs dropped from memory for the budget
    bad_files: int = 0      # disk files ignored: truncated, corrupt, another key or layout
    write_errors: int = 0   # disk files that could not be written (the cache goes on without them)


class ImageCache:
    """Slot blobs by image: `load_into` fills a slot from the cache (True) or says it must be encoded
    (False); `store_from` keeps what a slot holds after encoding. The memory map is under a lock."""

    def __init__(self, identity: str, *, max_bytes: int, directory: str | os.PathLike | None = None):
        if max_bytes < 0:
            raise ValueError(f"image cache budget must be >= 0 bytes, got {max_bytes}")
        self.identity, self.max_bytes = identity, int(max_bytes)
        self.directory = Path(directory) if directory else None
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                why = "not a directory" if self.directory.exists() and not self.directory.is_dir() else e.strerror or e
                raise ValueError(f"image cache directory {self.directory}: {why}") from None
        self.stats = CacheStats()
        self._memory: OrderedDict[str, bytes | bytearray | memoryview] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of the blobs held in memory (at most max_bytes)."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._memory)

    def entry_key(self, image_key: str) -> str:
        return hashlib.sha256(f"{self.identity}/{image_key}".encode()).hexdigest()

    def path_for(self, image_key: str) -> Path | None:
        """The disk file of an image (None without a directory)."""
        return self._file(self.entry_key(image_key)) if self.directory else None

    def load_into(self, ctx, slot: int, image_key: str) -> bool:
        """Fill `slot` with the cached K/V of the image; False (a miss) when there are none."""
        key = self.entry_key(image_key)
        with self._lock:
            blob = self._memory.get(key)
            if blob is not None:
                self._memory.move_to_end(key)
        if blob is not None and _restore(ctx, slot, blob, "memory"):
            self.stats.memory_hits += 1
            return True
        blob = self._read_file(key)
        if blob is not None:
            if _restore(ctx, slot, blob, str(self._file(key))):
                self.stats.disk_hits += 1
                self._keep(key, blob)
                return True
            self.stats.bad_files += 1
        self.stats.misses += 1
        return False

    def store_from(self, ctx, slot: int, image_key: str) -> None:
        """Keep what `slot` holds (just encoded) as the image's entry, in memory and on disk."""
        key = self.entry_key(image_key)
        blob = get_slot_state(ctx, slot)
        kept = self._keep(key, blob)
        if self._write_file(key, blob) or kept:  # (a blob over the budget, without a disk file, is not stored)
            self.stats.stores += 1

    def forget(self, image_key: str) -> None:
        """Drop an image's entry, in memory and on disk (one that gave non-finite logits: encoded again next time)."""
        key = self.entry_key(image_key)
        with self._lock:
            old = self._memory.pop(key, None)
            self._nbytes -= len(old) if old is not None else 0
        if self.directory is not None:
            try:
                self._file(key).unlink()
                log.warning("image cache: dropped %s (the model gave non-finite logits with it)", self._file(key))
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("image cache: cannot remove %s (%s)", self._file(key), e)

    def clear(self) -> None:
        """Forget the blobs held in memory (disk files stay)."""
        with self._lock:
            self._memory.clear()
            self._nbytes = 0

    # --- memory ------------------------------------------------------------------------------
    def _keep(self, key: str, blob: bytes | bytearray | memoryview) -> bool:
        """Hold the blob in memory, dropping the least recently used for the budget; False when it is over the
        whole budget (not held)."""
        with self._lock:
            old = self._memory.pop(key, None)
            self._nbytes -= len(old) if old is not None else 0
            if len(blob) > self.max_bytes:
                return False
            self._memory[key] = blob
            self._nbytes += len(blob)
            while self._nbytes > self.max_bytes:
                _, dropped = self._memory.popitem(last=False)
                self._nbytes -= len(dropped)
                self.stats.evictions += 1
        return True

    # --- disk --------------------------------------------------------------------------------
    def _file(self, key: str) -> Path:
        return self.directory / (key + SUFFIX)

    def _read_file(self, key: str) -> memoryview | None:
        if self.directory is None:
            return None
        path = self._file(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            data = b""
            log.warning("image cache: cannot read %s (%s)", path, e)
        blob = _unpack_file(data, key)
        if blob is None:
            self.stats.bad_files += 1
            log.warning("image cache: %s is not a valid entry; ignored (it will be replaced)", path)
        return blob

    def _write_file(self, key: str, blob: bytes | bytearray) -> bool:
        """Write the blob's disk file (atomically); False without a directory or when it cannot be written."""
        if self.directory is None:
            return False
        path = self._file(key)
        header = _HEADER.pack(_MAGIC, FORMAT_VERSION, bytes.fromhex(key), hashlib.sha256(blob).digest(), len(blob))
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".mlslot-", suffix=".tmp", dir=self.directory)
            # readable by whoever may read the directory (mkstemp's 0600 kept other accounts sharing it out), written
            # by its owner only (a shared 1777 directory had made every entry writable by any account)
            os.chmod(tmp, os.stat(self.directory).st_mode & 0o444 | 0o200)
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(blob)
            os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
            return True
        except OSError as e:
            self.stats.write_errors += 1
            log.warning("image cache: cannot write %s (%s)", path, e)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            return False


def _unpack_file(data: bytes, key: str) -> memoryview | None:
    """The blob of a disk file: None unless it is ours, this format, this key, whole and unaltered."""
    if len(data) < _HEADER.size:
        return None
    magic, version, file_key, digest, length = _HEADER.unpack_from(data)
    blob = memoryview(data)[_HEADER.size:]
    ok = magic == _MAGIC and version == FORMAT_VERSION and file_key == bytes.fromhex(key) and len(blob) == length
    return blob if ok and hashlib.sha256(blob).digest() == digest else None


def _restore(ctx, slot: int, blob: bytes | bytearray | memoryview, where: str) -> bool:
    """Fill the slot from a blob; False when the library refuses it (made for another layout)."""
    try:
        set_slot_state(ctx, slot, blob)
    except ValueError as e:
        log.warning("image cache: the entry in %s was refused (%s); encoding instead", where, e)
        return False
    return True


def for_model(slot_info: dict, *, identity: str, n_slots: int, max_bytes: int | None,
              directory: str | os.PathLike | None) -> ImageCache | None:
    """The cache of a model's context, or None when it has nothing to do (no image slots, or a zero
    budget and no directory). max_bytes None: room for the largest images of one full context or
    DEFAULT_IMAGES, whichever is more: max(n_slots, DEFAULT_IMAGES) x the largest blob (840 MB at the
    11B's dimensions with F16 slots, 4 tiles of 1601 positions x 8 cross layers x 2 x 8 heads x 128)."""
    budget = max(n_slots, DEFAULT_IMAGES) * int(slot_info["max_size"]) if max_bytes is None else int(max_bytes)
    if n_slots <= 0 or (budget == 0 and not directory):
        return None
    return ImageCache(identity, max_bytes=budget, directory=directory)


__all__ = ["CacheStats", "FORMAT_VERSION", "ImageCache", "for_model", "model_identity"]
