#include "gguf/conventions.h"

#include "gguf/names.h"
#include "common/error.h"
#include "gguf.h"
#include "gguf/gguf_file.h"

namespace mllama {

static bool has_key(const gguf_file & f, kv key) { return gguf_find_key(f.gguf(), key_name(key)) >= 0; }

static std::string arch_of(const gguf_file & f) {
    const int64_t id = gguf_find_key(f.gguf(), key_name(kv::GENERAL_ARCHITECTURE));
    return id >= 0 && gguf_get_kv_type(f.gguf(), id) == GGUF_TYPE_STRING ? gguf_get_val_str(f.gguf(), id) : "";
}

conventions detect_conventions(const std::vector<const gguf_file *> & files) {
    const gguf_file & main = *files[0];
    const std::string arch = arch_of(main);
    if (arch != k_arch_name) {
        fail(MLLAMA_ERR_FORMAT, "'%s' is not an mllama model (general.architecture = '%s')", main.path().c_str(),
             arch.c_str());
    }
    conventions c;
    const int64_t id = gguf_find_key(main.gguf(), key_name(kv::WEIGHTS_CONVENTION));
    if (id >= 0) {
        const std::string value = gguf_get_kv_type(main.gguf(), id) == GGUF_TYPE_STRING ? gguf_get_val_str(main.gguf(), id) : "";
        if (value != k_weights_convention) {
            fail(MLLAMA_ERR_UNSUPPORTED, "'%s' uses weight convention '%s', this build reads '%s'", main.path().c_str(),
                 value.c_str(), k_weights_convention);
        }
        if (files.size() > 1) {
            fail(MLLAMA_ERR_INVALID_ARGUMENT, "'%s' is a complete mllama model: it takes no projector file",
                 main.path().c_str());
        }
        return c;
    }
    const bool has_vision = main.find(tensor_name(tn::V_PATCH_EMBD)) != nullptr;
    c.gates_pretanh = c.rope_permuted = c.cross_qk_permuted = true;
    c.default_preprocessor = !has_key(main, kv::V_IMAGE_MEAN);
    if (has_vision && !main.find(tensor_name(tn::TOKEN_EMBD))) {  // an Ollama projector, named first or alone
        if (files.size() > 1) {
            fail(MLLAMA_ERR_INVALID_ARGUMENT, "'%s' is an Ollama vision projector: name its text model first, and "
                 "this file as the projector", main.path().c_str());
        }
        fail(MLLAMA_ERR_INVALID_ARGUMENT, "'%s' is an Ollama vision projector: load its text model, with this file "
             "as the projector (projector=, --projector)", main.path().c_str());
    }
    if (has_vision) {
        if (files.size() > 1) {
            fail(MLLAMA_ERR_INVALID_ARGUMENT, "'%s' already holds the vision model: it takes no projector file",
                 main.path().c_str());
        }
        c.format = MLLAMA_FORMAT_OLLAMA;
        return c;
    }
    if (files.size() < 2) {
        fail(MLLAMA_ERR_INVALID_ARGUMENT,
             "'%s' is an Ollama text model without its vision projector: pass the projector file too",
             main.path().c_str());
    }
    if (!files[1]->find(tensor_name(tn::V_PATCH_EMBD))) {
        fail(MLLAMA_ERR_FORMAT, "'%s' is not an mllama vision projector", files[1]->path().c_str());
    }
    c.format = MLLAMA_FORMAT_OLLAMA_SPLIT;
    c.fc_swapped = c.projector_names = true;
    return c;
}

static std::string replace(std::string s, const std::string & from, const std::string & to) {
    const size_t pos = s.find(from);
    return pos == std::string::npos ? s : s.replace(pos, from.size(), to);
}

std::string file_tensor_name(const conventions & conv, const std::string & canonical) {
    if (canonical.rfind("v.", 0) != 0) return canonical;
    std::string name = canonical;
    if (conv.fc_swapped) {
        if (name.find(".ffn_up.") != std::string::npos) name = replace(name, ".ffn_up.", ".ffn_down.");
        else if (name.find(".ffn_down.") != std::string::npos) name = replace(name, ".ffn_down.", ".ffn_up.");
    }
    if (conv.projector_names) {
        name = replace(name, ".attn_norm.", ".ln1.");
        name = replace(name, ".ffn_norm.", ".ln2.");
        name = replace(name, ".attn_output.", ".attn_out.");
    }
    return name;
}

std::vector<float> rope_permute_head(const std::vector<float> & in) {
    const size_t half = in.size() / 2;
    std::vector<float> out(in.size());
    for (size_t a = 0; a < 2; ++a) {
        for (size_t b = 0; b < half; ++b) out[2 * b + a] = in[a * half + b];
    }
    return out;
}

std::string conventions::describe() const {
    switch (format) {
        case MLLAMA_FORMAT_MLLAMA: return "mllama (raw Hugging Face parameters; nothing to undo)";
        case MLLAMA_FORMAT_OLLAMA:
        case MLLAMA_FORMAT_OLLAMA_SPLIT: break;
    }
    std::string s = format == MLLAMA_FORMAT_OLLAMA ? "Ollama single file (0.7.1+)" : "Ollama split text + projector files (0.4-0.6)";
    s += "; undone at load: gates stored as tanh(g) and the position gate as 1 - tanh(g); self-attention q/k"
         " RoPE-permuted (RoPE runs in normal mode); cross-attention q/k permuted without their norms (q_norm/k_norm"
         " permuted to match)";
    if (fc_swapped) s += "; projector names ln1/ln2/attn_out and the fc1/fc2 swap";
    if (default_preprocessor) s += "; no preprocessor constants in the file (CLIP mean/std and the standard aspect ratios assumed)";
    return s;
}

}  // namespace mllama
