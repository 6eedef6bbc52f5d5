// How the quantized products' threads share their work (kernels/x86/q6k_block.h's for_each_channel,
// q4k_block.h's for_each_group): chunks of output channels claimed at run time, not one fixed share per thread.
// With fixed halves, the two threads of a 2-core machine finished a call 0.3-1.2 ms apart on average (an
// interrupt, a slower moment of the memory: their busy times were equal over many calls, not per call), and the
// first to finish waited at ggml's barrier: 3-15% of an 8-row decode step, more while other processes used the
// cores. So each thread still owns a contiguous segment of the chunks and walks it from the front, streaming the
// weights as before, but a thread whose segment is done takes chunks from the back of the others' segments. The
// claims are compare-and-swaps on one 64-bit word per segment, reset to zero before the product runs (by the
// quantizing op that every product follows).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace mllama::work {

// One 64-bit word of claims per segment (front claims in the low half, back claims in the high half; a
// product has far fewer than 2^32 chunks); at most k_max_segments segments (threads beyond share them).
constexpr int k_max_segments = 32;
constexpr int64_t k_state_bytes = k_max_segments * static_cast<int64_t>(sizeof(uint64_t));

inline void reset(void * state) { std::memset(state, 0, k_state_bytes); }

// A product's n_items (channels, groups of channels) in chunks of `items` each, `count` chunks: about
// k_chunk_bytes of weights per chunk (they stay in L2 for a product's next pass over them), but at least 4
// chunks per thread, so that no thread waits long for the last one.
constexpr int64_t k_chunk_bytes = int64_t(256) << 10;

struct chunking {
    int64_t items, count;
};

inline chunking chunks_of(int64_t n_items, int64_t item_bytes, int nth) {
    const int64_t by_bytes = k_chunk_bytes / std::max<int64_t>(1, item_bytes);
    const int64_t by_threads = (n_items + 4 * int64_t(nth) - 1) / (4 * int64_t(nth));
    const int64_t items = std::max<int64_t>(1, std::min(by_bytes, by_threads));
    return {items, (n_items + items - 1) / items};
}

// One thread's claims on n_chunks chunks: next() gives chunk indices until all chunks are claimed (each
// exactly once over all threads).
class claimer {
public:
    claimer(void * state, int64_t n_chunks, int ith, int nth)
        : words_(static_cast<uint64_t *>(state)), n_chunks_(n_chunks),
          n_segments_(static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(nth, n_chunks), 1, k_max_segments))),
          segment_(ith % n_segments_) {}

    // The next chunk of the thread's own segment, else one from the back of another's.
    bool next(int64_t & chunk) {
        for (; tried_ < n_segments_; ++tried_, segment_ = (segment_ + 1) % n_segments_) {
            if (claim(segment_, /*from_back=*/tried_ > 0, chunk)) return true;
        }
        return false;
    }

private:
    // Chunks [first, end) of segment s: the same split for every thread.
    int64_t first(int s) const { return n_chunks_ * s / n_segments_; }

    bool claim(int s, bool from_back, int64_t & chunk) {
        const int64_t begin = first(s), len = first(s + 1) - begin;
        uint64_t seen = __atomic_load_n(words_ + s, __ATOMIC_RELAXED);
        for (;;) {
            const int64_t front = static_cast<int64_t>(seen & 0xFFFFFFFFu), back = static_cast<int64_t>(seen >> 32);
            if (front + back >= len) return false;
            const uint64_t claimed = seen + (from_back ? (uint64_t(1) << 32) : uint64_t(1));
            if (__atomic_compare_exchange_n(words_ + s, &seen, claimed, /*weak=*/true, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED)) {
                chunk = from_back ? begin + len - 1 - back : begin + front;
                return true;
            }
        }
    }

    uint64_t * words_;
    int64_t n_chunks_;
    int n_segments_, segment_, tried_ = 0;
};

}  // namespace mllama::work
