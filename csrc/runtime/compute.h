// The one loop every graph of a context goes through: build, allocate, feed the inputs, compute,
// fetch the outputs, on the context's scheduler.
#pragma once

#include <cstddef>
#include <functional>

struct ggml_cgraph;
struct ggml_context;
struct mllama_context;

namespace mllama {

// Most nodes of one graph (the scheduler's and the graph descriptors' capacity).
inline constexpr size_t k_max_nodes = 16384;

// Runs a body that reads or writes the context's device tensors (a graph, or a copy outside one: sequences,
// image slot states): a lost RPC worker fails it with MLLAMA_ERR_BACKEND, naming the worker, and marks the
// model lost; a model already lost fails at once.
void on_workers(const mllama_context & c, const std::function<void()> & body);

// Build a graph with `build` (which creates and returns its input tensors through captures),
// allocate it, let `feed` write the inputs, compute, then let `fetch` read the outputs.
void compute(mllama_context & c, const std::function<ggml_cgraph *(ggml_context *)> & build,
             const std::function<void()> & feed, const std::function<void()> & fetch);

}  // namespace mllama
