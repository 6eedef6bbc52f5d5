// Exception barrier for the C ABI: run a body, turn any exception into a status code and the
// thread-local last-error text. Every exported function that can fail goes through it.
#pragma once

#include "common/error.h"
#include "mllama.h"

#include <new>

namespace mllama {

template <typename F>
mllama_status guarded(F && body) {
    try {
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

}  // namespace mllama
