// An image encode in steps (runtime/encode_steps.h): each step is one graph over a span of stages, reading
// and writing the state kept in the job's buffer: the tower's hidden state, the intermediate layers' inputs
// (copied there as they are reached), the projector's output; the cross layers' K/V go into the slot.
#include "runtime/encode_steps.h"

#include "common/error.h"
#include "common/text.h"
#include "graph/cross_kv.h"
#include "graph/inputs.h"
#include "graph/vision.h"
#include "model/devices.h"
#include "model/model.h"
#include "runtime/compute.h"
#include "runtime/context.h"
#include "runtime/pages.h"
#include "runtime/rpc.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <memory>

namespace mllama {

encode_job::~encode_job() {
    if (buffer) free_quietly([&] { ggml_backend_buffer_free(buffer); });
    if (ctx) ggml_free(ctx);
}

// The job's tensors, allocated on the vision device; the mask set once for all the layers.
static std::unique_ptr<encode_job> new_job(const mllama_context & c, int32_t n_tiles) {
    const mllama_model & m = *c.model;
    const vision_hparams & hp = m.hp.vision;
    const int64_t D = hp.n_embd, L = padded_positions(hp.n_positions()), N = L * hp.max_tiles;
    auto job = std::make_unique<encode_job>();
    const size_t n_inter = hp.intermediate_layers.size();
    ggml_init_params params = {ggml_tensor_overhead() * (n_inter + 3), nullptr, /*no_alloc=*/true};
    job->ctx = ggml_init(params);
    if (!job->ctx) fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot create the state of an encode in steps");
    job->hidden = ggml_new_tensor_2d(job->ctx, GGML_TYPE_F32, D, N);       // [D, N]
    for (size_t k = 0; k < n_inter; ++k) job->inter.push_back(ggml_new_tensor_2d(job->ctx, GGML_TYPE_F32, D, N));
    job->mask = ggml_new_tensor_2d(job->ctx, GGML_TYPE_F16, N, N);          // [N, N]
    job->projected = ggml_new_tensor_2d(job->ctx, GGML_TYPE_F32, m.hp.text.n_embd, n_tiles * hp.n_positions());
    try {
        bound_rpc_calls(m.plan);
        job->buffer = ggml_backend_alloc_ctx_tensors_from_buft(job->ctx, ggml_backend_dev_buffer_type(m.plan.vision));
        if (!job->buffer) {
            const size_t bytes = ggml_nbytes(job->hidden) * (n_inter + 1) + ggml_nbytes(job->mask) +
                                 ggml_nbytes(job->projected);
            fail(MLLAMA_ERR_OUT_OF_MEMORY, "cannot allocate the state of an encode in steps (%zu MiB) on %s",
                 bytes >> 20, ggml_backend_dev_name(m.plan.vision));
        }
        advise_huge_pages(job->buffer);  // as the compute buffers: the mask is read by every layer's attention
        set_vision_mask(job->mask, hp.n_positions(), L, hp.max_tiles, n_tiles);
    } catch (const rpc_fault & e) {
        m.lost_worker = true;  // its weights on that worker are gone too
        fail(MLLAMA_ERR_BACKEND, "RPC worker %s failed while an image encode was set up: %s",
             join(lost_workers(m.plan.endpoints)).c_str(), e.what());
    }
    return job;
}

int32_t encode_begin(mllama_context & c, int32_t slot, const float * pixels, int64_t n_pixels,
                     int32_t aspect_ratio_id, int32_t n_tiles) {
    check_image_args(c, slot, pixels, n_pixels, aspect_ratio_id, n_tiles, nullptr, 0);
    drop_encode_job(c);
    c.slots[slot].used = false;
    std::unique_ptr<encode_job> job = new_job(c, n_tiles);
    job->slot = slot;
    job->aspect_ratio_id = aspect_ratio_id;
    job->n_tiles = n_tiles;
    job->n_stages = vision_n_stages(c.model->hp.vision) + 1 + static_cast<int>(c.state.cross_k.size());
    job->pixels.assign(pixels, pixels + n_pixels);
    c.encode_job = std::move(job);
    return c.encode_job->n_stages;
}

// One graph over stages [first, last): from the pixels or the kept hidden state, through the tower's stages
// to the kept hidden state, or on through the projector (its output kept) and the K/V of cross layers into
// the slot.
static void run_stages(mllama_context & c, encode_job & job, int first, int last) {
    const mllama_model & m = *c.model;
    const int n_tower = vision_n_stages(m.hp.vision), projector = n_tower;
    const vision_options opt = vision_options_for(m, c.kernels);
    vision_inputs in;
    in.mask = job.mask;
    auto build = [&](ggml_context * ctx) {
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, c.max_nodes, /*grads=*/false);
        std::vector<ggml_tensor *> inter = job.inter;
        ggml_tensor * h = job.hidden;  // [D, N]
        if (first < n_tower) {
            h = build_vision_stages(ctx, m, in, opt, first, std::min(last, n_tower), job.hidden,
                                    [&](size_t k, ggml_tensor * t) {  // kept before any later layer overwrites it
                                        inter[k] = ggml_cpy(ctx, t, job.inter[k]);
                                        ggml_build_forward_expand(gf, inter[k]);
                                    });
            if (last <= n_tower) {  // after every read of the kept state in this graph
                ggml_build_forward_expand(gf, ggml_cpy(ctx, h, job.hidden));
                return gf;
            }
        }
        ggml_tensor * x = job.projected;  // [n_embd, n_tiles * P]
        if (first <= projector) {
            ggml_tensor * out = build_vision_output(ctx, m.hp.vision, h, inter);  // [OD, P, NT]
            x = project_vision(ctx, m, image_tiles(ctx, out, job.n_tiles), opt);
            if (last == projector + 1) {
                ggml_build_forward_expand(gf, ggml_cpy(ctx, x, job.projected));
                return gf;
            }
        }
        const int first_cross = std::max(first, projector + 1) - (projector + 1);
        const cross_kv kv = build_cross_kv_layers(ctx, m, x, opt, first_cross, last - (projector + 1));
        expand_slot_kv(ctx, gf, c, kv, static_cast<size_t>(first_cross), job.slot);
        return gf;
    };
    auto feed = [&] {
        if (in.pixels) ggml_backend_tensor_set(in.pixels, job.pixels.data(), 0, ggml_nbytes(in.pixels));
        if (in.ar_id) ggml_backend_tensor_set(in.ar_id, &job.aspect_ratio_id, 0, sizeof(int32_t));
    };
    compute(c, build, feed, [] {});
}

int32_t encode_step(mllama_context & c, int32_t n_stages) {
    if (!c.encode_job) fail(MLLAMA_ERR_INVALID_ARGUMENT, "no image encode in steps is under way (encode_begin)");
    encode_job & job = *c.encode_job;
    const int first = job.next_stage;
    const int last = n_stages <= 0 ? job.n_stages : std::min(job.n_stages, first + n_stages);
    try {
        run_stages(c, job, first, last);
    } catch (...) {  // the kept state is no longer that of a stage boundary
        c.encode_job.reset();
        throw;
    }
    job.next_stage = last;
    if (first == 0) job.pixels = {};
    if (last < job.n_stages) return job.n_stages - last;
    finish_slot(c, job.slot, job.aspect_ratio_id, job.n_tiles);
    c.encode_job.reset();
    return 0;
}

void drop_encode_job(mllama_context & c, int32_t slot) {
    if (c.encode_job && (slot < 0 || c.encode_job->slot == slot)) c.encode_job.reset();
}

}  // namespace mllama
