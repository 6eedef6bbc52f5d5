// The quantized products' sharing of work (csrc/kernels/work_chunks.h) under real threads: every chunk is
// claimed exactly once, each thread walks its own segment from the front in order, and the chunks of a thread
// that starts late (here: after the others are done) are all taken by the others. Built and run by
// tests/test_qmm_kernels.py; prints "ok" or the first failure (exit status 1).
#include "kernels/work_chunks.h"

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

namespace {

bool fail(const char * what, int nth, int64_t n_chunks) {
    std::printf("FAIL %s (threads %d, chunks %lld)\n", what, nth, static_cast<long long>(n_chunks));
    return false;
}

// nth threads claim n_chunks chunks; thread `late` (-1: none) starts only when the others have finished.
bool check(int nth, int64_t n_chunks, int late) {
    alignas(64) unsigned char state[mllama::work::k_state_bytes];
    mllama::work::reset(state);
    std::vector<std::atomic<int>> times_claimed(static_cast<size_t>(n_chunks));
    std::vector<std::vector<int64_t>> claimed(static_cast<size_t>(nth));
    std::atomic<int> finished{0};
    std::vector<std::thread> threads;
    for (int ith = 0; ith < nth; ++ith) {
        threads.emplace_back([&, ith] {
            if (ith == late) {
                while (finished.load() < nth - 1) std::this_thread::yield();
            }
            mllama::work::claimer claims(state, n_chunks, ith, nth);
            for (int64_t c = 0; claims.next(c);) {
                if (c >= 0 && c < n_chunks) times_claimed[static_cast<size_t>(c)]++;
                claimed[static_cast<size_t>(ith)].push_back(c);
                if (c % 3 == ith % 3) std::this_thread::yield();  // uneven progress: some threads steal
            }
            finished++;
        });
    }
    for (std::thread & t : threads) t.join();
    for (int64_t c = 0; c < n_chunks; ++c) {
        if (times_claimed[static_cast<size_t>(c)] != 1) return fail("a chunk claimed other than once", nth, n_chunks);
    }
    const int n_segments = static_cast<int>(std::min<int64_t>({nth, n_chunks, mllama::work::k_max_segments}));
    for (int ith = 0; ith < nth; ++ith) {
        const std::vector<int64_t> & mine = claimed[static_cast<size_t>(ith)];
        if (ith == late && !mine.empty()) return fail("the late thread found work left", nth, n_chunks);
        if (n_segments != nth) continue;  // shared segments: their owners' front claims interleave
        // the sole owner of a segment takes its chunks from the front, in order, before any other segment's
        const int64_t first = n_chunks * ith / n_segments, end = n_chunks * (ith + 1) / n_segments;
        size_t n_own = 0;
        while (n_own < mine.size() && mine[n_own] >= first && mine[n_own] < end) {
            if (mine[n_own] != first + static_cast<int64_t>(n_own)) {
                return fail("an owner skipped within its segment", nth, n_chunks);
            }
            ++n_own;
        }
        for (size_t i = n_own; i < mine.size(); ++i) {
            if (mine[i] >= first && mine[i] < end) return fail("an owner came back to its segment", nth, n_chunks);
        }
    }
    return true;
}

}  // namespace

int main() {
    for (int nth : {1, 2, 3, 5, 8, 40}) {
        for (int64_t n_chunks : {1, 2, 3, 7, 64, 1000}) {
            for (int late : {-1, nth - 1}) {
                if (late == 0 && nth == 1) continue;  // a lone thread is never late
                if (!check(nth, n_chunks, late)) return 1;
            }
        }
    }
    std::printf("ok\n");
    return 0;
}
