#include "gguf/names.h"

#include <cstdio>
#include <stdexcept>

namespace mllama {

#define MLLAMA_KEY_ENTRY(id, name) {#id, name, false},
#define MLLAMA_TENSOR_ENTRY(id, name) {#id, name, true},
static const name_entry k_names[] = {MLLAMA_KEYS(MLLAMA_KEY_ENTRY) MLLAMA_TENSORS(MLLAMA_TENSOR_ENTRY)};
#undef MLLAMA_KEY_ENTRY
#undef MLLAMA_TENSOR_ENTRY

static constexpr int k_n_keys = static_cast<int>(kv::COUNT);

const char * key_name(kv key) { return k_names[static_cast<int>(key)].name; }

std::string tensor_name(tn tensor, int layer) {
    const char * pattern = k_names[k_n_keys + static_cast<int>(tensor)].name;
    char buf[128];
    if (layer < 0) return pattern;
    std::snprintf(buf, sizeof(buf), pattern, layer);
    return buf;
}

int name_count() { return static_cast<int>(sizeof(k_names) / sizeof(k_names[0])); }

const name_entry & name_at(int index) {
    if (index < 0 || index >= name_count()) throw std::out_of_range("name index");
    return k_names[index];
}

}  // namespace mllama
