#include "runtime/rope.h"

#include "model/hparams.h"

#include <cmath>

namespace mllama {

// ref: transformers 5.23.0 modeling_rope_utils.py _compute_llama3_parameters; ggml divides theta by the factor.
std::vector<float> llama3_rope_factors(const text_hparams & t) {
    const int64_t half = t.n_embd_head / 2;
    std::vector<float> factors(static_cast<size_t>(half));
    const double low_wl = t.rope_orig_ctx / t.rope_low_freq_factor, high_wl = t.rope_orig_ctx / t.rope_high_freq_factor;
    for (int64_t i = 0; i < half; ++i) {
        const float inv = 1.0f / std::pow(t.rope_freq_base, static_cast<float>(2 * i) / static_cast<float>(t.n_embd_head));
        const double wl = 2.0 * M_PI / inv;
        float scaled = inv;
        if (wl > low_wl) {
            scaled = inv / t.rope_factor;
        } else if (wl >= high_wl) {
            const double smooth =
                (t.rope_orig_ctx / wl - t.rope_low_freq_factor) / (t.rope_high_freq_factor - t.rope_low_freq_factor);
            scaled = static_cast<float>((1.0 - smooth) * inv / t.rope_factor + smooth * inv);
        }
        factors[i] = inv / scaled;
    }
    return factors;
}

}  // namespace mllama
