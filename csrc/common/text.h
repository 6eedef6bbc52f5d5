// Comma lists and joined names: device lists, RPC endpoints, kernel names.
#pragma once

#include <string>
#include <vector>

namespace mllama {

// "a, b,,c" -> {"a", "b", "c"}: items trimmed of spaces, empty ones dropped; NULL -> {}.
std::vector<std::string> split_list(const char * list);

// {"a", "b"} -> "a, b".
std::string join(const std::vector<std::string> & items, const char * separator = ", ");

}  // namespace mllama
