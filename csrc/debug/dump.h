// Opt-in tensor dumps (the seeds' tensor-dump debugging made a feature): every graph node whose
// name matches a regex is written to <dir>/<name>.npy (NumPy order, float32) through the
// scheduler's eval callback, and its name appended to <dir>/order.txt in evaluation order.
#pragma once

#include <regex>
#include <string>

struct ggml_tensor;

namespace mllama {

class tensor_dumper {
  public:
    tensor_dumper(const std::string & dir, const std::string & filter);
    // ggml_backend_sched_eval_callback
    static bool callback(ggml_tensor * t, bool ask, void * user_data);

  private:
    bool wanted(const ggml_tensor * t) const;
    void write(const ggml_tensor * t) const;

    std::string dir_;
    std::regex filter_;
};

}  // namespace mllama
