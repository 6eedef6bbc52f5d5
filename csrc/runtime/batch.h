// A decode batch as the graph builders and the input writers see it: the tokens of several
// sequences, each sequence's rows contiguous (mllama_batch_seq after its checks in decode.cpp).
#pragma once

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

}  // namespace mllama
