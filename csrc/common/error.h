// Errors inside the library are C++ exceptions carrying an mllama_status; the C ABI shims in api/
// turn them into a status code plus the thread-local last-error text (api/guard.h).
#pragma once

#include "mllama.h"

#include <stdexcept>
#include <string>

namespace mllama {

struct error : std::runtime_error {
    mllama_status status;
    error(mllama_status st, const std::string & msg) : std::runtime_error(msg), status(st) {}
};

[[noreturn]] void fail(mllama_status status, const char * fmt, ...) __attribute__((format(printf, 2, 3)));

// Shape as "[a, b, c]" in ggml order (ne[0] first).
std::string shape_str(const long long * ne, int n_dims);

}  // namespace mllama
