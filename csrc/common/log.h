// Logging through the caller's callback (per model), never a global sink of ours. ggml's own
// messages are forwarded to the callback of the mllama call running on the same thread.
#pragma once

#include "mllama.h"

namespace mllama {

struct logger {
    mllama_log_callback callback = nullptr;
    void * user_data = nullptr;
    int level = MLLAMA_LOG_INFO;

    void log(int lvl, const char * fmt, ...) const __attribute__((format(printf, 3, 4)));
};

// While alive, ggml messages raised on this thread go to `sink` (nullptr: dropped).
struct log_scope {
    explicit log_scope(const logger * sink);
    ~log_scope();
    log_scope(const log_scope &) = delete;
    log_scope & operator=(const log_scope &) = delete;

  private:
    const logger * prev_;
};

// The last error line ggml logged on this thread (cleared by each log_scope); used to explain a
// failure that ggml reports only as a null return (gguf parsing).
const char * last_ggml_error();

}  // namespace mllama
