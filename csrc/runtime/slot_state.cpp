// Image slots saved and restored. The blob holds a slot's rows key-major ([head_dim, n_head_kv, n_rows] per cache
// tensor; n_vis = max_tiles * n_positions, vision token index = tile * n_positions + p) whatever the caches' layout
// (runtime/context.h): key-major caches give them as one byte range per tensor, head-major ones as one range per
// head, gathered and scattered here; both copied with ggml_backend_tensor_get/set on any backend.
#include "runtime/slot_state.h"

#include "common/error.h"
#include "model/model.h"
#include "runtime/compute.h"
#include "runtime/context.h"
#include "runtime/encode_steps.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace mllama {

namespace {

constexpr char k_magic[8] = {'M', 'L', 'L', 'A', 'M', 'A', 'S', 'S'};
constexpr uint32_t k_version = 1;  // a reader refuses every other version

// The blob's header: fixed-width fields in the writer's byte order (a blob from a machine of the
// other byte order fails the version check).
struct slot_header {
    char magic[8];
    uint32_t version;
    int32_t type;  // ggml_type of the K/V
    int32_t n_cross_layer;
    int32_t n_head_kv;
    int32_t n_embd_head;
    int32_t n_positions;
    int32_t max_tiles;
    int32_t n_tiles;  // of the image held: its K/V rows are n_tiles * n_positions per tensor
    int32_t aspect_ratio_id;
    uint32_t reserved;  // 0
    uint64_t payload;   // bytes after the header
};
static_assert(std::is_trivially_copyable_v<slot_header>, "the header is copied as bytes");

void check_slot_index(const mllama_context & c, int32_t slot) {
    if (slot < 0 || slot >= static_cast<int32_t>(c.slots.size())) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "image slot %d out of range (%zu slots)", slot, c.slots.size());
    }
    if (c.state.cross_k.empty()) fail(MLLAMA_ERR_UNSUPPORTED, "the model has no cross-attention layers");
}

// Bytes of one vision token's K (or V) row: head_dim * n_head_kv values.
size_t row_bytes(const mllama_context & c) {
    const ggml_tensor * k = c.state.cross_k[0];
    return ggml_row_size(k->type, k->ne[0]) * static_cast<size_t>(c.model->hp.text.n_head_kv);
}

// Bytes of the rows of n_tiles tiles in one cache tensor.
size_t tile_bytes(const mllama_context & c, int64_t n_tiles) {
    return static_cast<size_t>(n_tiles * c.model->hp.vision.n_positions()) * row_bytes(c);
}

// Rows first..first + n of `slot` in cache tensor t from host (key-major, as read_slot_rows gives them; null: zeros).
void write_rows(const mllama_context & c, ggml_tensor * t, int32_t slot, int64_t first, int64_t n,
                const uint8_t * host) {
    const int64_t row0 = slot * c.state.n_vis + first;
    if (!c.state.cross_head_major) {
        const std::vector<uint8_t> zeros(host ? 0 : static_cast<size_t>(n) * row_bytes(c));
        return ggml_backend_tensor_set(t, host ? host : zeros.data(), row0 * row_bytes(c), n * row_bytes(c));
    }
    const size_t head_bytes = t->nb[1], n_heads = static_cast<size_t>(t->ne[2]);  // t: [hd, keys, Hkv]
    std::vector<uint8_t> rows(static_cast<size_t>(n) * head_bytes);
    for (size_t h = 0; h < n_heads; ++h) {
        for (size_t j = 0; host && j < static_cast<size_t>(n); ++j)
            std::memcpy(rows.data() + j * head_bytes, host + (j * n_heads + h) * head_bytes, head_bytes);
        ggml_backend_tensor_set(t, rows.data(), h * t->nb[2] + row0 * head_bytes, rows.size());
    }
}

// The header this context writes, and expects, for an image of n_tiles tiles.
slot_header layout_of(const mllama_context & c, int32_t n_tiles, int32_t aspect_ratio_id) {
    const ggml_tensor * k = c.state.cross_k[0];
    slot_header h{};
    std::memcpy(h.magic, k_magic, sizeof(k_magic));
    h.version = k_version;
    h.type = static_cast<int32_t>(k->type);
    h.n_cross_layer = static_cast<int32_t>(c.state.cross_k.size());
    h.n_head_kv = static_cast<int32_t>(c.model->hp.text.n_head_kv);
    h.n_embd_head = static_cast<int32_t>(k->ne[0]);
    h.n_positions = static_cast<int32_t>(c.model->hp.vision.n_positions());
    h.max_tiles = static_cast<int32_t>(c.model->hp.vision.max_tiles);
    h.n_tiles = n_tiles;
    h.aspect_ratio_id = aspect_ratio_id;
    h.payload = 2 * static_cast<uint64_t>(h.n_cross_layer) * tile_bytes(c, n_tiles);
    return h;
}

std::string describe(const slot_header & h) {
    const char * type = h.type >= 0 && h.type < GGML_TYPE_COUNT ? ggml_type_name(static_cast<ggml_type>(h.type)) : "?";
    return std::to_string(h.n_cross_layer) + " cross layers x " + std::to_string(h.n_head_kv) + " kv heads x " +
           std::to_string(h.n_embd_head) + " dims x " + std::to_string(h.max_tiles) + " tiles of " +
           std::to_string(h.n_positions) + " positions, " + type;
}

bool same_layout(const slot_header & a, const slot_header & b) {
    return a.type == b.type && a.n_cross_layer == b.n_cross_layer && a.n_head_kv == b.n_head_kv &&
           a.n_embd_head == b.n_embd_head && a.n_positions == b.n_positions && a.max_tiles == b.max_tiles;
}

// The image a blob says it holds: a tile count and an aspect ratio of this model that agree.
void check_image(const mllama_context & c, const slot_header & h) {
    const auto & ratios = c.model->hp.vision.aspect_ratios;
    const bool known = h.aspect_ratio_id >= 1 && h.aspect_ratio_id <= static_cast<int32_t>(ratios.size());
    if (!known || ratios[h.aspect_ratio_id - 1].first * ratios[h.aspect_ratio_id - 1].second != h.n_tiles) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "slot state: aspect ratio id %d with %d tiles is not one of the model's",
             h.aspect_ratio_id, h.n_tiles);
    }
}

// The header of a blob, checked against this context before anything is written.
slot_header read_header(const mllama_context & c, const void * src, uint64_t size) {
    slot_header h{};
    if (!src) fail(MLLAMA_ERR_INVALID_ARGUMENT, "set_slot_state needs the slot state");
    if (size < sizeof(h)) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "slot state of %llu bytes is shorter than its %zu-byte header",
             (unsigned long long) size, sizeof(h));
    }
    std::memcpy(&h, src, sizeof(h));
    if (std::memcmp(h.magic, k_magic, sizeof(k_magic)) != 0) fail(MLLAMA_ERR_INVALID_ARGUMENT, "not a slot state");
    if (h.version != k_version) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "slot state format version %u, this library reads version %u", h.version,
             k_version);
    }
    const slot_header want = layout_of(c, 0, 0);
    if (!same_layout(h, want)) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "slot state made for %s; this context's slots are %s", describe(h).c_str(),
             describe(want).c_str());
    }
    check_image(c, h);
    const uint64_t payload = layout_of(c, h.n_tiles, h.aspect_ratio_id).payload;
    if (h.payload != payload || size != sizeof(h) + payload) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "slot state of %llu bytes; %zu + %llu expected for %d tiles",
             (unsigned long long) size, sizeof(h), (unsigned long long) payload, h.n_tiles);
    }
    return h;
}

}  // namespace

void read_slot_rows(const mllama_context & c, const ggml_tensor * t, int32_t slot, int64_t first, int64_t n,
                    uint8_t * host) {
    const int64_t row0 = slot * c.state.n_vis + first;
    if (!c.state.cross_head_major) return ggml_backend_tensor_get(t, host, row0 * row_bytes(c), n * row_bytes(c));
    const size_t head_bytes = t->nb[1], n_heads = static_cast<size_t>(t->ne[2]);  // t: [hd, keys, Hkv]
    std::vector<uint8_t> rows(static_cast<size_t>(n) * head_bytes);
    for (size_t h = 0; h < n_heads; ++h) {
        ggml_backend_tensor_get(t, rows.data(), h * t->nb[2] + row0 * head_bytes, rows.size());
        for (size_t j = 0; j < static_cast<size_t>(n); ++j)
            std::memcpy(host + (j * n_heads + h) * head_bytes, rows.data() + j * head_bytes, head_bytes);
    }
}

mllama_slot_state_info slot_state_info(const mllama_context & c) {
    if (c.state.cross_k.empty()) fail(MLLAMA_ERR_UNSUPPORTED, "the context has no image slots");
    const slot_header h = layout_of(c, static_cast<int32_t>(c.model->hp.vision.max_tiles), 0);
    mllama_slot_state_info out{};
    out.version = h.version;
    out.type = h.type;
    out.n_cross_layer = h.n_cross_layer;
    out.n_head_kv = h.n_head_kv;
    out.n_embd_head = h.n_embd_head;
    out.n_positions = h.n_positions;
    out.max_tiles = h.max_tiles;
    out.max_size = sizeof(slot_header) + h.payload;
    return out;
}

uint64_t get_slot_state(const mllama_context & c, int32_t slot, void * dst, uint64_t cap) {
    check_slot_index(c, slot);
    const image_slot & s = c.slots[slot];
    if (!s.used) fail(MLLAMA_ERR_INVALID_ARGUMENT, "image slot %d holds no image", slot);
    const slot_header h = layout_of(c, s.n_tiles, s.aspect_ratio_id);
    const uint64_t size = sizeof(h) + h.payload;
    if (!dst) return size;
    if (cap < size) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "the buffer holds %llu bytes, the slot state needs %llu",
             (unsigned long long) cap, (unsigned long long) size);
    }
    auto * out = static_cast<uint8_t *>(dst);
    std::memcpy(out, &h, sizeof(h));
    const int64_t n_rows = s.n_tiles * c.model->hp.vision.n_positions();
    size_t at = sizeof(h);
    on_workers(c, [&] {
        for (size_t i = 0; i < c.state.cross_k.size(); ++i) {
            for (const ggml_tensor * t : {c.state.cross_k[i], c.state.cross_v[i]}) {
                read_slot_rows(c, t, slot, 0, n_rows, out + at);
                at += tile_bytes(c, s.n_tiles);
            }
        }
    });
    return size;
}

void clear_missing_tiles(mllama_context & c, int32_t slot, int32_t n_tiles) {
    const int64_t max_tiles = c.model->hp.vision.max_tiles;
    if (n_tiles >= max_tiles) return;
    const int64_t per_tile = c.model->hp.vision.n_positions();
    on_workers(c, [&] {
        for (size_t i = 0; i < c.state.cross_k.size(); ++i) {
            for (ggml_tensor * t : {c.state.cross_k[i], c.state.cross_v[i]}) {
                write_rows(c, t, slot, n_tiles * per_tile, (max_tiles - n_tiles) * per_tile, nullptr);
            }
        }
    });
}

void set_slot_state(mllama_context & c, int32_t slot, const void * src, uint64_t size) {
    check_slot_index(c, slot);
    const slot_header h = read_header(c, src, size);
    drop_encode_job(c, slot);
    image_slot & s = c.slots[slot];
    s.used = false;
    const int64_t n_rows = h.n_tiles * c.model->hp.vision.n_positions();
    const auto * in = static_cast<const uint8_t *>(src) + sizeof(h);
    on_workers(c, [&] {
        for (size_t i = 0; i < c.state.cross_k.size(); ++i) {
            for (ggml_tensor * t : {c.state.cross_k[i], c.state.cross_v[i]}) {
                write_rows(c, t, slot, 0, n_rows, in);
                in += tile_bytes(c, h.n_tiles);
            }
        }
    });
    clear_missing_tiles(c, slot, h.n_tiles);
    s.used = true;
    s.n_tiles = h.n_tiles;
    s.aspect_ratio_id = h.aspect_ratio_id;
}

}  // namespace mllama
