// Errors inside the library are C++ exceptions carrying an mllama_status; the C ABI shims in
// api.cpp turn them into a status code plus the thread-local last-error text.
#pragma once

#include "mllama.h"

#include <cstdarg>
#include <stdexcept>
#include <string>

namespace mllama {

struct error : std::runtime_error {
    mllama_status status;
    error(mllama_status st, const std::string & msg) : std::runtime_error(msg), status(st) {}
};

std::string format(const char * fmt, ...) __attribute__((format(printf, 1, 2)));

[[noreturn]] void fail(mllama_status status, const char * fmt, ...) __attribute__((format(printf, 2, 3)));

// Set the thread-local last-error text of the C ABI (api.cpp).
void set_last_error(const char * msg);

// Shape as "[a, b, c]" in ggml order (ne[0] first).
std::string shape_str(const long long * ne, int n_dims);

}  // namespace mllama
