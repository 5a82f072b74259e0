// Reading and writing safetensors files, with a validating header parser.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "runtime/io/checkpoint_files.h"

namespace moex {

/// Limits the reader enforces before trusting a file.
struct SafetensorsLimits {
  std::uint64_t max_header_bytes = 100ull << 20;   ///< JSON header size cap
  std::uint64_t max_file_bytes = 64ull << 30;      ///< whole file cap
  std::int64_t max_rank = 8;                       ///< dimensions per tensor
};

/// One tensor's entry in a safetensors header.
struct SafetensorsEntry {
  std::string name;
  std::string dtype;                 ///< "F32", "BF16", "F16", "F64", "I64", "I32", ...
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;           ///< byte offset into the data section
  std::uint64_t end = 0;
  std::int64_t numel() const;
};

/// A safetensors file opened for reading. The header is validated on open: 8-byte little-endian
/// header length within limits and the file, JSON object, known dtypes, dtype size x shape equal to
/// the byte length, offsets in bounds, tensors contiguous and covering the data section without
/// overlap or gaps. Any violation throws moex::IoError naming the file, the tensor and the rule.
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path, const SafetensorsLimits& limits = {});
  /// The same over the file's bytes already in memory (read once, e.g. to verify its checksum):
  /// its tensors are then read from `bytes`, never from the file again. `path` names it in errors.
  static SafetensorsFile from_bytes(FileBytes bytes, const std::string& path, const SafetensorsLimits& limits = {});

  const std::string& path() const { return path_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  /// Throws IoError "tensor NAME missing from FILE" when absent.
  const SafetensorsEntry& entry(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// Reads a tensor as float32 (F32 as is; BF16, F16, F64 and F8_E4M3 converted; FP8 without its
  /// block scales: see HfCheckpoint::read_weight). When `expected_shape`
  /// is non-empty the tensor's shape must equal it, else IoError naming both shapes.
  std::vector<float> read_f32(const std::string& name,
                              const std::vector<std::int64_t>& expected_shape = {}) const;

 private:
  /// Validates a file of `file_size` bytes whose byte ranges `read(at, to, n)` supplies.
  static SafetensorsFile parse(const std::string& path, std::uint64_t file_size, const SafetensorsLimits& limits,
                               const std::function<bool(std::uint64_t, char*, std::uint64_t)>& read);

  std::string path_;
  FileBytes bytes_;  ///< the whole file (from_bytes), or no data: read the file
  std::uint64_t data_offset_ = 0;  ///< file offset of the data section
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

/// A shape as "[2, 3]", for messages.
std::string shape_str(const std::vector<std::int64_t>& shape);

/// One F8_E4M3 ("fn": no infinities, S.1111.111 = NaN) byte as float.
float fp8_e4m3_to_float(std::uint8_t b);

/// A float32 tensor to write.
struct NamedTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  std::vector<float> data;  ///< row-major, size == product(shape)
};

/// A float32 tensor to write from memory the caller keeps (no copy).
struct TensorView {
  std::string name;
  std::vector<std::int64_t> shape;
  const float* data = nullptr;
  std::int64_t numel = 0;  ///< == product(shape)
};

/// Writes float32 tensors (sorted by name, as safetensors requires an order-free header) to `path`:
/// a temporary beside it, fsync, rename. Returns the file's checksum (Checksum, checkpoint_files.h),
/// computed while writing. Throws IoError on I/O failure, InvalidArgument on a shape/data size
/// mismatch or duplicate name.
std::string write_safetensors(const std::string& path, const std::vector<TensorView>& tensors,
                              const std::map<std::string, std::string>& metadata = {});
/// The same from tensors that own their values.
void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace moex
