// Data that kernels read a cache line at a time (a zmm, an AMX tile row: 64 bytes) placed on cache-line
// boundaries: a 64-byte read that straddles two lines is read as two. ggml's graph allocator places tensors on
// 32-byte boundaries and std::vector's storage on 16, so a kernel's packed tensor holds k_cache_line bytes more and
// starts at line_aligned(data), and its scratch rows live in a line_vector.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace mllama {

constexpr int64_t k_cache_line = 64;

// The first cache-line boundary at or after data.
template <class T> inline T * line_aligned(void * data) {
    const auto address = reinterpret_cast<uintptr_t>(data);
    return reinterpret_cast<T *>((address + k_cache_line - 1) & ~static_cast<uintptr_t>(k_cache_line - 1));
}
template <class T> inline const T * line_aligned(const void * data) {
    return line_aligned<T>(const_cast<void *>(data));
}

// std::vector's allocator, on cache-line boundaries.
template <class T> struct line_allocator {
    using value_type = T;
    line_allocator() = default;
    template <class U> line_allocator(const line_allocator<U> &) {}
    T * allocate(size_t n) { return static_cast<T *>(::operator new(n * sizeof(T), std::align_val_t(k_cache_line))); }
    void deallocate(T * p, size_t) { ::operator delete(p, std::align_val_t(k_cache_line)); }
    template <class U> bool operator==(const line_allocator<U> &) const { return true; }
    template <class U> bool operator!=(const line_allocator<U> &) const { return false; }
};
template <class T> using line_vector = std::vector<T, line_allocator<T>>;

}  // namespace mllama
