// A decode batch as the graph builders and the input writers see it: the tokens of several
// sequences, each sequence's rows contiguous (mllama_batch_seq after its checks in decode.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mllama {

// One sequence's part of a batch: rows first_row .. first_row + n_tokens - 1, at positions n_past ..
struct batch_part {
    int32_t seq = 0, n_past = 0, n_tokens = 0, first_row = 0;
    std::vector<int32_t> slots;            // image slots its rows may attend to, in prompt order
    const uint8_t * row_images = nullptr;  // n_tokens x slots.size(): 1 where the row attends to image m
};

// The image slots a batch reads: [first, first + count), the span of every part's slots (count 0: none).
struct slot_span {
    int64_t first = 0, count = 0;
};

inline slot_span slots_read(const std::vector<batch_part> & parts) {
    int64_t lo = INT64_MAX, hi = -1;
    for (const batch_part & p : parts) {
        for (int32_t slot : p.slots) {
            lo = slot < lo ? slot : lo;
            hi = slot > hi ? slot : hi;
        }
    }
    return hi < 0 ? slot_span{} : slot_span{lo, hi - lo + 1};
}

// Parts whose self-attention runs as one: a part of several tokens (a prefill) alone, or consecutive one-token parts
// (decoding sequences) whose sequence ids go up in even steps, so that one attention reads all their caches through
// a strided view (graph/decoder.cpp): with one attention per part, 8 decoding sequences took 8 attentions, 16 copies
// into the caches and 7 concatenations per layer.
struct attention_group {
    size_t first_part = 0, n_parts = 0;
    int32_t seq_step = 1;  // between the sequence ids of consecutive parts
    int32_t n_kv = 0;      // cells read per sequence: the most any of its parts sees
    bool one_token = false;  // parts of one token each (else one part of several)
};

inline std::vector<attention_group> attention_groups(const std::vector<batch_part> & parts) {
    std::vector<attention_group> groups;
    for (size_t i = 0; i < parts.size();) {
        attention_group g;
        g.first_part = i, g.one_token = parts[i].n_tokens == 1;
        size_t end = i + 1;
        if (g.one_token) {
            int32_t step = 0;
            for (; end < parts.size() && parts[end].n_tokens == 1; ++end) {
                const int32_t d = parts[end].seq - parts[end - 1].seq;
                if (d <= 0 || (step != 0 && d != step)) break;
                step = d;
            }
            g.seq_step = step > 0 ? step : 1;
        }
        g.n_parts = end - i;
        for (size_t k = i; k < end; ++k) g.n_kv = std::max(g.n_kv, parts[k].n_past + parts[k].n_tokens);
        groups.push_back(g);
        i = end;
    }
    return groups;
}

}  // namespace mllama
