// The sequences of a context: how many positions each one's cache cells hold, trimming, and copying
// a prefix from one sequence to another (cells of sequence s: s * n_ctx .. (s + 1) * n_ctx - 1, runtime/context.h).
#include "common/error.h"
#include "graph/ops.h"
#include "runtime/compute.h"
#include "runtime/context.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace mllama {

static void check_seq(const mllama_context & c, int32_t seq) {
    const int32_t n_seq = static_cast<int32_t>(c.seq_length.size());
    if (seq < 0 || seq >= n_seq) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "sequence id %d out of range [0, %d) (n_seq_max)", seq, n_seq);
    }
}

int32_t seq_length(const mllama_context & c, int32_t seq) {
    check_seq(c, seq);
    return c.seq_length[seq];
}

void seq_trim(mllama_context & c, int32_t seq, int32_t n_keep) {
    check_seq(c, seq);
    if (n_keep < 0) fail(MLLAMA_ERR_INVALID_ARGUMENT, "cannot keep %d positions", n_keep);
    c.seq_length[seq] = std::min(c.seq_length[seq], n_keep);
}

// Copies n cells of one cache tensor (either layout: a block per head where head-major) from cell `from` to `to`.
static void copy_cells(ggml_tensor * cache, bool head_major, int64_t from, int64_t to, int64_t n,
                       std::vector<uint8_t> & staging) {
    const cache_strides st = strides_of(cache, head_major);
    const size_t bytes = static_cast<size_t>(n) * st.row;
    for (int64_t h = 0; h < (head_major ? cache->ne[2] : 1); ++h) {
        const size_t src = from * st.row + h * st.head, dst = to * st.row + h * st.head;
        if (ggml_backend_buffer_is_host(cache->buffer)) {
            auto * data = static_cast<uint8_t *>(cache->data);
            std::memmove(data + dst, data + src, bytes);
            continue;
        }
        staging.resize(bytes);
        ggml_backend_tensor_get(cache, staging.data(), src, bytes);
        ggml_backend_tensor_set(cache, staging.data(), dst, bytes);
    }
}

void seq_copy(mllama_context & c, int32_t src, int32_t dst, int32_t n_tokens) {
    check_seq(c, src);
    check_seq(c, dst);
    if (src == dst) fail(MLLAMA_ERR_INVALID_ARGUMENT, "cannot copy sequence %d onto itself", src);
    if (n_tokens < 0 || n_tokens > c.seq_length[src]) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "sequence %d holds %d positions: cannot copy %d", src, c.seq_length[src],
             n_tokens);
    }
    c.seq_length[dst] = 0;  // half copied until the end
    const int64_t n_ctx = c.params.n_ctx;
    std::vector<uint8_t> staging;
    on_workers(c, [&] {
        for (const auto * list : {&c.state.self_k, &c.state.self_v}) {
            for (ggml_tensor * cache : *list) {
                if (cache) copy_cells(cache, c.state.self_head_major, src * n_ctx, dst * n_ctx, n_tokens, staging);
            }
        }
    });
    c.seq_length[dst] = n_tokens;
}

}  // namespace mllama
