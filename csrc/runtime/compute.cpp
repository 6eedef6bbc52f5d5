#include "runtime/compute.h"

#include "common/error.h"
#include "common/text.h"
#include "model/model.h"
#include "runtime/context.h"
#include "runtime/pages.h"
#include "runtime/rpc.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <string>
#include <utility>
#include <vector>

namespace mllama {

// Maps in, before a graph's first run, the pages of the file-mapped weights it reads whole (else a
// warm page cache still costs a page fault per 4 KiB inside the first run), split across the
// threads; weights already done are skipped. Only on first use, so that loading (the
// converter's check, text-only work) does not pull in every page of the file; tables read by rows
// (token embeddings, position embeddings per aspect ratio) keep faulting in only the rows used.
static void populate_weights(mllama_context & c, ggml_cgraph * gf) {
    std::vector<std::pair<const uint8_t *, size_t>> ranges;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        const ggml_tensor * node = ggml_graph_node(gf, i);
        for (const ggml_tensor * src : node->src) {
            if (!src || !src->buffer) continue;
            if (ggml_backend_buffer_get_usage(src->buffer) != GGML_BACKEND_BUFFER_USAGE_WEIGHTS) continue;
            if (node->op == GGML_OP_GET_ROWS && src == node->src[0]) continue;
            if (!ggml_backend_buffer_is_host(src->buffer) || !c.populated.insert(src).second) continue;
            ranges.emplace_back(static_cast<const uint8_t *>(src->data), ggml_nbytes(src));
        }
    }
    if (!ranges.empty()) populate_pages(std::move(ranges), c.params.n_threads);
}

static void run_graph(mllama_context & c, const std::function<ggml_cgraph *(ggml_context *)> & build,
                      const std::function<void()> & feed, const std::function<void()> & fetch) {
    log_scope scope(&c.log);
    ggml_init_params params = {c.graph_meta.size(), c.graph_meta.data(), /*no_alloc=*/true};
    ggml_context * gctx = ggml_init(params);
    if (!gctx) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot create a graph context");
    struct guard {
        ggml_context * ctx;
        ~guard() { ggml_free(ctx); }
    } g{gctx};
    ggml_cgraph * gf = build(gctx);
    ggml_backend_sched_reset(c.sched);
    if (!ggml_backend_sched_alloc_graph(c.sched, gf)) {
        fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot allocate the compute graph");
    }
    advise_huge_pages(gf);
    populate_weights(c, gf);
    feed();
    if (ggml_backend_sched_graph_compute(c.sched, gf) != GGML_STATUS_SUCCESS) {
        fail(MLLAMA_ERR_BACKEND, "graph computation failed");
    }
    fetch();
}

// A lost RPC worker ends the model's life: the weights it held are gone with it.
[[noreturn]] static void fail_lost_worker(const mllama_context & c, const char * what) {
    c.model->lost_worker = true;
    const std::vector<std::string> & all = c.model->plan.endpoints;
    bool all_answer = false;
    const std::vector<std::string> dead = lost_workers(all, &all_answer);
    fail(MLLAMA_ERR_BACKEND, "RPC worker %s %s (%s); the model cannot run any more: close it and load it again "
         "(in a new process, if it needs this worker: README, Faults)", join(dead).c_str(),
         all_answer ? "failed" : "is unreachable", what);
}

void on_workers(const mllama_context & c, const std::function<void()> & body) {
    if (c.model->lost_worker) {
        fail(MLLAMA_ERR_BACKEND, "an RPC worker of this model failed earlier: close the model and load it again");
    }
    try {
        body();
    } catch (const rpc_fault & e) {
        fail_lost_worker(c, e.what());
    }
}

void compute(mllama_context & c, const std::function<ggml_cgraph *(ggml_context *)> & build,
             const std::function<void()> & feed, const std::function<void()> & fetch) {
    on_workers(c, [&] { run_graph(c, build, feed, fetch); });
}

}  // namespace mllama
