"""An image slot saved and restored (mllama_context_*_slot_state): the cross-attention K/V an image
left in a slot, as one blob whose header names the layout it was made for. The library refuses a
blob made for another layout or truncated (ValueError with its reason)."""

from __future__ import annotations

from .ffi import call, ffi, lib, struct_to_dict


def slot_state_info(ctx) -> dict:
    """The layout of the context's slots (version, type, n_cross_layer, n_head_kv, n_embd_head,
    n_positions, max_tiles) and max_size, the bytes of the largest blob."""
    out = ffi.new("mllama_slot_state_info *")
    call(lib.mllama_context_slot_state_info, ctx, out)
    return struct_to_dict(out)


def get_slot_state(ctx, slot: int) -> bytearray:
    """The blob of what `slot` holds."""
    size = ffi.new("uint64_t *")
    call(lib.mllama_context_get_slot_state, ctx, slot, ffi.NULL, 0, size)
    blob = bytearray(size[0])
    call(lib.mllama_context_get_slot_state, ctx, slot, ffi.from_buffer(blob), len(blob), size)
    return blob


def set_slot_state(ctx, slot: int, blob: bytes | bytearray | memoryview) -> None:
    """Fill `slot` from a blob of get_slot_state."""
    view = memoryview(blob).cast("B")
    call(lib.mllama_context_set_slot_state, ctx, slot, ffi.from_buffer(view), view.nbytes)


__all__ = ["get_slot_state", "set_slot_state", "slot_state_info"]
