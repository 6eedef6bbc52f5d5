#include "common/parallel.h"

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

namespace mllama {

void parallel_for(size_t n_items, int n_threads, const std::function<void(size_t)> & fn) {
    std::atomic<size_t> next{0};
    auto work = [&] {
        for (size_t i = next++; i < n_items; i = next++) fn(i);
    };
    const size_t n_extra = std::min(n_items, static_cast<size_t>(std::max(n_threads, 1))) - (n_items > 0 ? 1 : 0);
    std::vector<std::thread> pool;
    for (size_t i = 0; i < n_extra; ++i) pool.emplace_back(work);
    work();
    for (std::thread & t : pool) t.join();
}

}  // namespace mllama
