#include "common/text.h"

namespace mllama {

std::vector<std::string> split_list(const char * list) {
    std::vector<std::string> out;
    const std::string text = list ? list : "";
    for (size_t begin = 0; begin <= text.size();) {
        size_t end = text.find(',', begin);
        if (end == std::string::npos) end = text.size();
        const std::string item = text.substr(begin, end - begin);
        const size_t first = item.find_first_not_of(' '), last = item.find_last_not_of(' ');
        if (first != std::string::npos) out.push_back(item.substr(first, last - first + 1));
        begin = end + 1;
    }
    return out;
}

std::string join(const std::vector<std::string> & items, const char * separator) {
    std::string out;
    for (const std::string & item : items) out += (out.empty() ? "" : separator) + item;
    return out;
}

}  // namespace mllama
