// Exception barrier for the C ABI: run a body, turn any exception into a status code and the
// thread-local last-error text. Every exported function that can fail goes through it.
#pragma once

#include "common/error.h"
#include "mllama.h"

#include <cstdint>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

namespace mllama {

// Set the thread-local last-error text of the C ABI (api_library.cpp).
void set_last_error(const char * msg);

// Unlocked until a model of this process is loaded with RPC workers (note_rpc_use), then a process-wide lock
// (runtime/rpc.cpp): ggml keeps one connection per worker for the whole process, shared by every model that uses
// it, and two calls' messages on it must not interleave. From then on the C ABI's calls run one at a time.
std::unique_lock<std::recursive_mutex> rpc_exclusive();
void note_rpc_use();

template <typename F>
mllama_status guarded(F && body) {
    try {
        const std::unique_lock<std::recursive_mutex> exclusive = rpc_exclusive();
        set_last_error("");
        body();
        return MLLAMA_OK;
    } catch (const error & e) {
        set_last_error(e.what());
        return e.status;
    } catch (const std::bad_alloc &) {
        set_last_error("out of memory");
        return MLLAMA_ERR_OUT_OF_MEMORY;
    } catch (const std::exception & e) {
        set_last_error(e.what());
        return MLLAMA_ERR_INTERNAL;
    } catch (...) {
        set_last_error("unknown error");
        return MLLAMA_ERR_INTERNAL;
    }
}

// An argument check: fails with MLLAMA_ERR_INVALID_ARGUMENT and `what` as the message.
inline void require(bool ok, const char * what) {
    if (!ok) fail(MLLAMA_ERR_INVALID_ARGUMENT, "%s", what);
}

// For the functions that return a count instead of a status: sets the last error, returns -1.
inline int32_t count_error(const char * msg) {
    set_last_error(msg);
    return -1;
}

// Copies up to cap values into buf (NULL: none) and returns how many there are.
template <typename T>
int32_t copy_ints(const std::vector<T> & values, int32_t * buf, int32_t cap) {
    const int32_t n = static_cast<int32_t>(values.size());
    for (int32_t i = 0; buf && i < cap && i < n; ++i) buf[i] = static_cast<int32_t>(values[i]);
    return static_cast<int32_t>(values.size());
}

// Copies a string NUL-terminated into buf (up to cap bytes, cut if longer; NULL: none); *len (if
// given) receives its full length.
inline void copy_string(const char * value, uint64_t n, char * buf, uint64_t cap, uint64_t * len) {
    if (len) *len = n;
    if (!buf || cap == 0) return;
    const uint64_t copy = n < cap - 1 ? n : cap - 1;
    for (uint64_t i = 0; i < copy; ++i) buf[i] = value[i];
    buf[copy] = '\0';
}

// (a, b) pairs as a, b, a, b, ...
inline std::vector<int> flatten(const std::vector<std::pair<int, int>> & pairs) {
    std::vector<int> flat;
    for (const auto & [a, b] : pairs) flat.insert(flat.end(), {a, b});
    return flat;
}

}  // namespace mllama
