// Saving and restoring one image slot (mllama_context_get/set_slot_state): a blob whose header names
// the layout it was made for, then for every cross-attention layer the K rows and the V rows of the
// tiles the image has. The image cache (python/mllama/generation/image_cache.py) keeps these blobs.
#pragma once

#include "mllama.h"

#include <cstdint>

struct ggml_tensor;
struct mllama_context;

namespace mllama {

// The layout of this context's slots and the size of the largest blob.
mllama_slot_state_info slot_state_info(const mllama_context & ctx);

// The size of the blob of what `slot` holds; the blob is copied into dst (cap bytes) unless dst is null.
uint64_t get_slot_state(const mllama_context & ctx, int32_t slot, void * dst, uint64_t cap);

// Fills `slot` from a blob of get_slot_state (exactly `size` bytes); a foreign blob is refused before
// anything is written. The tiles the image does not have are zeroed (the decoder masks them).
void set_slot_state(mllama_context & ctx, int32_t slot, const void * src, uint64_t size);

// Rows first..first + n of `slot` in a cross-attention cache tensor t into host, key-major ([hd, Hkv, n], the blob's
// order) whatever the caches' layout (runtime/context.h).
void read_slot_rows(const mllama_context & ctx, const ggml_tensor * t, int32_t slot, int64_t first, int64_t n,
                    uint8_t * host);

// Zeroes the rows of the tiles past n_tiles in every cross-attention K and V of `slot` (the decoder masks them;
// zeros keep every path that reads them finite, and a slot encoded or restored the same bytes).
void clear_missing_tiles(mllama_context & ctx, int32_t slot, int32_t n_tiles);

}  // namespace mllama
