#include "gguf/gguf_file.h"

#include "common/error.h"
#include "ggml.h"
#include "gguf.h"
#include "common/log.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace mllama {

gguf_file::gguf_file(const std::string & path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) fail(MLLAMA_ERR_IO, "cannot open '%s': %s", path.c_str(), std::strerror(errno));
    struct stat st {};
    if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd_);
        fail(MLLAMA_ERR_IO, "'%s' is not a regular file", path.c_str());
    }
    size_ = static_cast<uint64_t>(st.st_size);
    try {
        check_magic();
        gguf_init_params params = {/*no_alloc =*/true, /*ctx =*/&meta_};
        gguf_ = gguf_init_from_file(path.c_str(), params);
        if (!gguf_) {
            const char * why = last_ggml_error();
            fail(MLLAMA_ERR_FORMAT, "'%s' is a corrupt or truncated GGUF file%s%s", path.c_str(), *why ? ": " : "",
                 why);
        }
        check_bounds();
    } catch (...) {
        release();
        throw;
    }
}

gguf_file::~gguf_file() { release(); }

void gguf_file::release() {
    if (map_addr_) ::munmap(map_addr_, size_);
    map_addr_ = nullptr;
    if (meta_) ggml_free(meta_);
    meta_ = nullptr;
    if (gguf_) gguf_free(gguf_);
    gguf_ = nullptr;
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
}

void gguf_file::check_magic() const {
    char magic[4] = {0, 0, 0, 0};
    if (size_ < 4) {
        fail(MLLAMA_ERR_FORMAT, "'%s' is not a GGUF file (%llu bytes)", path_.c_str(), (unsigned long long) size_);
    }
    read(0, magic, 4);
    if (std::memcmp(magic, "GGUF", 4) != 0) {
        fail(MLLAMA_ERR_FORMAT, "'%s' is not a GGUF file (bad magic)", path_.c_str());
    }
}

void gguf_file::check_bounds() const {
    const uint64_t base = gguf_get_data_offset(gguf_);
    for (int64_t i = 0; i < gguf_get_n_tensors(gguf_); ++i) {
        const uint64_t begin = base + gguf_get_tensor_offset(gguf_, i);
        const uint64_t nbytes = gguf_get_tensor_size(gguf_, i);
        if (begin > size_ || nbytes > size_ - begin) {
            fail(MLLAMA_ERR_FORMAT, "'%s' is truncated: tensor '%s' ends at byte %llu of a %llu-byte file", path_.c_str(),
                 gguf_get_tensor_name(gguf_, i), (unsigned long long) (begin + nbytes), (unsigned long long) size_);
        }
    }
}

ggml_tensor * gguf_file::find(const std::string & name) const { return ggml_get_tensor(meta_, name.c_str()); }

int64_t gguf_file::n_tensors() const { return gguf_get_n_tensors(gguf_); }

const char * gguf_file::tensor_name(int64_t index) const { return gguf_get_tensor_name(gguf_, index); }

uint64_t gguf_file::data_offset(const std::string & name) const {
    const int64_t id = gguf_find_tensor(gguf_, name.c_str());
    if (id < 0) fail(MLLAMA_ERR_INTERNAL, "tensor '%s' not in '%s'", name.c_str(), path_.c_str());
    return gguf_get_data_offset(gguf_) + gguf_get_tensor_offset(gguf_, id);
}

void gguf_file::map() {
    if (map_addr_ || size_ == 0) return;
    void * addr = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd_, 0);
    if (addr == MAP_FAILED) fail(MLLAMA_ERR_IO, "cannot mmap '%s': %s", path_.c_str(), std::strerror(errno));
    map_addr_ = addr;
}

void gguf_file::read(uint64_t offset, void * dst, size_t size) const {
    auto * out = static_cast<uint8_t *>(dst);
    while (size > 0) {
        const ssize_t n = ::pread(fd_, out, size, static_cast<off_t>(offset));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            fail(MLLAMA_ERR_IO, "cannot read '%s' at byte %llu: %s", path_.c_str(), (unsigned long long) offset,
                 n == 0 ? "end of file" : std::strerror(errno));
        }
        out += n;
        offset += static_cast<uint64_t>(n);
        size -= static_cast<size_t>(n);
    }
}

}  // namespace mllama
