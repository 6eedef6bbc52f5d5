#include "common/log.h"

#include "ggml.h"

#include <cstdarg>
#include <cstdio>
#include <mutex>
#include <string>

namespace mllama {

static thread_local const logger * t_sink = nullptr;
static thread_local std::string t_last_ggml_error;

const char * last_ggml_error() { return t_last_ggml_error.c_str(); }

void logger::log(int lvl, const char * fmt, ...) const {
    if (!callback || lvl < level) return;
    char buf[1024];
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    callback(lvl, buf, user_data);
}

static int from_ggml_level(ggml_log_level lvl) {
    switch (lvl) {
        case GGML_LOG_LEVEL_ERROR: return MLLAMA_LOG_ERROR;
        case GGML_LOG_LEVEL_WARN: return MLLAMA_LOG_WARN;
        case GGML_LOG_LEVEL_INFO: return MLLAMA_LOG_INFO;
        default: return MLLAMA_LOG_DEBUG;
    }
}

static void forward_ggml_log(ggml_log_level lvl, const char * text, void *) {
    if (lvl == GGML_LOG_LEVEL_CONT || !text) return;
    std::string line(text);
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
    if (line.empty()) return;
    if (lvl == GGML_LOG_LEVEL_ERROR) t_last_ggml_error = line;
    const logger * sink = t_sink;
    const int level = from_ggml_level(lvl);
    if (sink && sink->callback && level >= sink->level) sink->callback(level, line.c_str(), sink->user_data);
}

log_scope::log_scope(const logger * sink) : prev_(t_sink) {
    // ggml has one process-wide log hook; ours is stateless and routes per thread.
    static std::once_flag installed;
    std::call_once(installed, [] { ggml_log_set(forward_ggml_log, nullptr); });
    t_sink = sink;
    t_last_ggml_error.clear();
}

log_scope::~log_scope() { t_sink = prev_; }

}  // namespace mllama
