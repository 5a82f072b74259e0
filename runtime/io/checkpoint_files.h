// Files that must survive a crash: atomic writes, fsync, checksums, and a checkpoint folder's
// layout (Hugging Face shard names, the `latest` pointer).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moex {

/// A file's checksum, fed in pieces: FNV-1a 64 over the bytes taken as little-endian 64-bit words
/// (the last 1-7 bytes zero-padded into one word, then the byte count folded in), so it runs a
/// word per multiply; hex() is 16 hex digits.
class Checksum {
 public:
  void update(const void* data, std::size_t n);
  std::string hex() const;

 private:
  std::uint64_t h_ = 1469598103934665603ull;
  std::uint64_t bytes_ = 0;
  unsigned char pending_[8] = {};
  std::size_t npending_ = 0;
};
/// A whole file's bytes, read-only, kept alive by `data` (shared: a SafetensorsFile over them keeps
/// them as long as it lives).
struct FileBytes {
  std::shared_ptr<const char> data;
  std::size_t size = 0;
  std::string_view view() const { return {data.get(), size}; }
};
/// IoError naming `path` and `what` it was meant to be unless it is a regular file (or a link to
/// one): a folder, FIFO, socket or device is refused before it is opened, so that a FIFO cannot
/// block the reader forever and a device is not read as a file.
void check_regular_file(const std::string& path, const std::string& what);
/// IoError naming `path` when it exists and is not a regular file (or a link): an atomic write,
/// which renames a temporary over its path, would replace a device or FIFO there with a file.
void check_atomic_target(const std::string& path);
/// The file mapped into memory (mmap, read-only): its pages are read from disk once, on first
/// touch, and cost no memory beyond the page cache. IoError naming the file.
FileBytes map_file(const std::string& path);
/// Checksum of a file's bytes. IoError naming the file when unreadable.
std::string file_checksum(const std::string& path);
/// fsync of a file or folder (IoError naming it on failure).
void fsync_path(const std::string& path);
/// Makes a finished temporary file `tmp` the file `path`: fsync of `tmp`, rename over `path`, fsync
/// of the folder. A crash leaves the old file or the new one, never a part.
void commit_file(const std::string& tmp, const std::string& path);
/// Writes `text` to `path` atomically: a temporary beside it, then commit_file().
void write_file_atomic(const std::string& path, const std::string& text);
/// The whole file as a string (IoError naming it).
std::string read_file(const std::string& path);

/// Hugging Face shard names: model-00002-of-00004.safetensors (`index` from 0).
std::string shard_name(const std::string& stem, int index, int count);
/// A checkpoint folder's name for a step: step-00000010.
std::string step_folder(std::int64_t step);
/// `path` itself when it holds a checkpoint (trainer_state.json), else the one its `latest` file
/// names. IoError saying what was looked for otherwise.
std::string resolve_checkpoint(const std::string& path);
/// Checkpoint folders (step-*) directly under `dir`, oldest step first.
std::vector<std::string> list_checkpoints(const std::string& dir);

}  // namespace moex
