// One GGUF file: parsed metadata and tensor descriptors (ggml_context with no data), bounds-checked
// against the file size, optionally memory-mapped read-only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

struct gguf_context;
struct ggml_context;
struct ggml_tensor;

namespace mllama {

class gguf_file {
  public:
    explicit gguf_file(const std::string & path);
    ~gguf_file();
    gguf_file(const gguf_file &) = delete;
    gguf_file & operator=(const gguf_file &) = delete;

    const std::string & path() const { return path_; }
    uint64_t size() const { return size_; }
    const gguf_context * gguf() const { return gguf_; }
    // Descriptor of a tensor (type and shape; no data), nullptr if the file has none of that name.
    ggml_tensor * find(const std::string & name) const;
    int64_t n_tensors() const;
    const char * tensor_name(int64_t index) const;
    // Absolute file offset of a tensor's data.
    uint64_t data_offset(const std::string & name) const;

    void map();  // mmap the whole file read-only
    const uint8_t * mapping() const { return static_cast<const uint8_t *>(map_addr_); }
    // Read `size` bytes at `offset` into dst (pread).
    void read(uint64_t offset, void * dst, size_t size) const;

  private:
    void release();
    void check_magic() const;
    void check_bounds() const;

    std::string path_;
    uint64_t size_ = 0;
    int fd_ = -1;
    gguf_context * gguf_ = nullptr;
    ggml_context * meta_ = nullptr;
    void * map_addr_ = nullptr;
};

}  // namespace mllama
