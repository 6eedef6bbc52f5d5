// The placement report: where each component of a loaded model went and why (mllama_model_get_placement,
// `mllama info`, the load log).
#pragma once

struct mllama_model;

namespace mllama {

// Fills m.placement from m.plan and the loaded weights, and logs it (info level).
void report_placement(mllama_model & m);

}  // namespace mllama
