// Opt-in per-op timings (mllama_context_params.profile_path): the scheduler's eval callback asks for every
// node, so ggml computes the graph one node at a time and the wall time of each node is known.
// Times are summed per (op, weight type, shape of the first source) and written as TSV, slowest
// first, when the context is freed. Single-node splits add a little synchronisation overhead per
// node, so the totals run slightly above a normal run; the shares are what matters.
#pragma once

#include <chrono>
#include <map>
#include <string>

struct ggml_tensor;

namespace mllama {

class op_profiler {
  public:
    explicit op_profiler(std::string path) : path_(std::move(path)) {}
    ~op_profiler();
    // ggml_backend_sched_eval_callback
    static bool callback(ggml_tensor * t, bool ask, void * user_data);

  private:
    struct entry {
        double seconds = 0;
        double flops = 0;
        long long count = 0;
    };
    void record(const ggml_tensor * t);
    void write() const;

    std::string path_;
    std::map<std::string, entry> entries_;
    std::chrono::steady_clock::time_point last_;
};

}  // namespace mllama
