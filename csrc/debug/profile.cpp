#include "debug/profile.h"

#include "ggml.h"

#include <algorithm>
#include <cstdio>
#include <vector>

namespace mllama {

// Multiply-adds x 2 for the matrix products, 0 otherwise (reported as GFLOPS).
static double op_flops(const ggml_tensor * t) {
    if (t->op == GGML_OP_MUL_MAT) return 2.0 * static_cast<double>(t->src[0]->ne[0]) * static_cast<double>(ggml_nelements(t));
    if (t->op == GGML_OP_FLASH_ATTN_EXT) {  // q [D, n_q, H], k [D, n_kv, H_kv]: QK^T and PV
        const ggml_tensor * q = t->src[0], * k = t->src[1];
        return 4.0 * static_cast<double>(q->ne[0]) * static_cast<double>(q->ne[1]) * static_cast<double>(q->ne[2]) *
               static_cast<double>(q->ne[3]) * static_cast<double>(k->ne[1]);
    }
    return 0.0;
}

static std::string op_key(const ggml_tensor * t) {
    std::string key = ggml_op_desc(t);
    const ggml_tensor * src = t->src[0];
    if (src) {
        char shape[96];
        std::snprintf(shape, sizeof(shape), " %s[%lld,%lld,%lld]", ggml_type_name(src->type), (long long) src->ne[0],
                      (long long) src->ne[1], (long long) src->ne[2]);
        key += shape;
        if (t->src[1]) key += std::string(" x ") + ggml_type_name(t->src[1]->type);
    }
    return key;
}

bool op_profiler::callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * self = static_cast<op_profiler *>(user_data);
    if (ask) {  // the scheduler computes this node right after the answer
        self->last_ = std::chrono::steady_clock::now();
        return true;
    }
    self->record(t);
    return true;
}

void op_profiler::record(const ggml_tensor * t) {
    const auto now = std::chrono::steady_clock::now();
    entry & e = entries_[op_key(t)];
    e.seconds += std::chrono::duration<double>(now - last_).count();
    e.flops += op_flops(t);
    e.count += 1;
    last_ = now;
}

op_profiler::~op_profiler() { write(); }

void op_profiler::write() const {
    std::vector<std::pair<std::string, entry>> rows(entries_.begin(), entries_.end());
    std::sort(rows.begin(), rows.end(), [](const auto & a, const auto & b) { return a.second.seconds > b.second.seconds; });
    double total = 0;
    for (const auto & r : rows) total += r.second.seconds;
    FILE * f = std::fopen(path_.c_str(), "w");
    if (!f) return;  // a destructor does not throw; the caller asked for an optional report
    std::fprintf(f, "seconds\tshare\tcount\tgflops\top\n");
    for (const auto & [key, e] : rows) {
        const double gflops = e.seconds > 0 ? e.flops / e.seconds / 1e9 : 0.0;
        std::fprintf(f, "%.4f\t%.3f\t%lld\t%.1f\t%s\n", e.seconds, total > 0 ? e.seconds / total : 0.0, e.count, gflops, key.c_str());
    }
    std::fprintf(f, "%.4f\t1.000\t-\t-\ttotal\n", total);
    std::fclose(f);
}

}  // namespace mllama
