// The one work loop of the library's own threads (ggml's graphs use ggml's thread pool): items are
// handed out one at a time to n_threads threads, the calling thread being one of them.
#pragma once

#include <cstddef>
#include <functional>

namespace mllama {

// Calls fn(i) for every i in [0, n_items), on min(n_threads, n_items) threads (at least the
// caller's). fn must not throw: the items run on other threads, whose exceptions cannot propagate.
void parallel_for(size_t n_items, int n_threads, const std::function<void(size_t)> & fn);

}  // namespace mllama
