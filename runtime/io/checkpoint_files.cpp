// Atomic files, checksums and the checkpoint folder's names.
#include "runtime/io/checkpoint_files.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "base/error.h"

namespace moex {
namespace fs = std::filesystem;

namespace {
constexpr std::uint64_t kFnvPrime = 1099511628211ull;
std::uint64_t load_le64(const unsigned char* p) {
  std::uint64_t w;
  std::memcpy(&w, p, 8);  // little-endian hosts only (safetensors.cpp asserts it)
  return w;
}
}  // namespace

void Checksum::update(const void* data, std::size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  bytes_ += n;
  while (n > 0 && npending_ > 0) {  // finish a word begun by the last piece
    pending_[npending_++] = *p++;
    --n;
    if (npending_ == 8) {
      h_ = (h_ ^ load_le64(pending_)) * kFnvPrime;
      npending_ = 0;
    }
  }
  std::uint64_t h = h_;
  for (; n >= 8; p += 8, n -= 8) h = (h ^ load_le64(p)) * kFnvPrime;
  h_ = h;
  for (; n > 0; --n) pending_[npending_++] = *p++;
}

std::string Checksum::hex() const {
  std::uint64_t h = h_;
  if (npending_ > 0) {
    unsigned char last[8] = {};
    std::memcpy(last, pending_, npending_);
    h = (h ^ load_le64(last)) * kFnvPrime;
  }
  h = (h ^ bytes_) * kFnvPrime;
  char out[17];
  std::snprintf(out, sizeof out, "%016llx", static_cast<unsigned long long>(h));
  return out;
}

namespace {
const char* kind_of(const struct stat& st) {
  return S_ISDIR(st.st_mode)                          ? "a folder"
         : S_ISFIFO(st.st_mode)                       ? "a FIFO"
         : S_ISSOCK(st.st_mode)                       ? "a socket"
         : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device"
                                                      : "not a regular file";
}
}  // namespace

void check_regular_file(const std::string& path, const std::string& what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw IoError("cannot open " + what + " " + path + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) throw IoError(what + " " + path + " is " + kind_of(st) + "; expected a regular file");
}

void check_atomic_target(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0 || S_ISREG(st.st_mode) || S_ISLNK(st.st_mode)) return;
  throw IoError("cannot write " + path + ": it is " + kind_of(st) +
                "; files are written atomically (a temporary beside it, then renamed over it), so give the path "
                "of a regular file or of one that does not exist yet");
}

FileBytes map_file(const std::string& path) {
  // O_NONBLOCK: a FIFO opens at once instead of waiting for a writer, and is refused below.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw IoError("cannot open " + path + ": " + std::strerror(errno));
  struct stat st {};
  const bool stat_ok = ::fstat(fd, &st) == 0;
  const int stat_err = errno;
  if (!stat_ok || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IoError(stat_ok ? "file " + path + " is " + kind_of(st) + "; expected a regular file"
                          : "cannot stat " + path + ": " + std::strerror(stat_err));
  }
  FileBytes out;
  out.size = static_cast<std::size_t>(st.st_size);
  if (out.size == 0) {  // mmap refuses 0 bytes
    ::close(fd);
    out.data = std::make_shared<const char>('\0');
    return out;
  }
  void* p = ::mmap(nullptr, out.size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);  // the mapping stays valid without the descriptor
  if (p == MAP_FAILED) throw IoError("cannot map " + path + " into memory: " + std::strerror(err));
  const std::size_t n = out.size;
  out.data = std::shared_ptr<const char>(static_cast<const char*>(p),
                                         [n](const char* q) { ::munmap(const_cast<char*>(q), n); });
  return out;
}

std::string file_checksum(const std::string& path) {
  // Read as a load reads it (map_file), so that save and load hash the same bytes the same way.
  const FileBytes bytes = map_file(path);
  Checksum sum;
  sum.update(bytes.data.get(), bytes.size);
  return sum.hex();
}

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw IoError("cannot open " + path + " to sync it: " + std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) throw IoError("fsync of " + path + " failed: " + std::strerror(err));
}

void write_file_atomic(const std::string& path, const std::string& text) {
  check_atomic_target(path);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw IoError("cannot write " + tmp + ": " + std::strerror(errno));
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    if (!out) throw IoError("writing " + tmp + " failed: " + std::strerror(errno));
  }
  commit_file(tmp, path);
}

void commit_file(const std::string& tmp, const std::string& path) {
  check_atomic_target(path);  // never a rename over /dev/null or a FIFO
  fsync_path(tmp);  // the bytes are on disk before the name says they are there
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    throw IoError("cannot move " + tmp + " to " + path + ": " + std::strerror(errno));
  const fs::path parent = fs::path(path).parent_path();
  fsync_path(parent.empty() ? std::string(".") : parent.string());
}

std::string read_file(const std::string& path) {
  check_regular_file(path, "file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("cannot read " + path + ": " + std::strerror(errno));
  std::ostringstream s;
  s << in.rdbuf();
  if (in.bad()) throw IoError("reading " + path + " failed: " + std::strerror(errno));
  return s.str();
}

std::string shard_name(const std::string& stem, int index, int count) {
  char b[64];
  std::snprintf(b, sizeof b, "-%05d-of-%05d.safetensors", index + 1, count);
  return stem + b;
}

std::string step_folder(std::int64_t step) {
  char b[32];
  std::snprintf(b, sizeof b, "step-%08lld", static_cast<long long>(step));
  return b;
}

std::string resolve_checkpoint(const std::string& path) {
  const fs::path p(path);
  if (fs::exists(p / "trainer_state.json")) return p.string();
  if (fs::exists(p / "latest")) {
    std::string name = read_file((p / "latest").string());
    while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
    if (name.empty() || name.find('/') != std::string::npos)
      throw IoError((p / "latest").string() + " names '" + name + "': expected a checkpoint folder beside it (step-N)");
    const fs::path c = p / name;
    if (!fs::exists(c / "trainer_state.json"))
      throw IoError((p / "latest").string() + " names " + c.string() + ", which holds no trainer_state.json");
    return c.string();
  }
  throw IoError("no checkpoint at " + path + ": expected a checkpoint folder (with trainer_state.json) or a save "
                "folder with a `latest` file");
}

std::vector<std::string> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<long long, std::string>> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (!e.is_directory() || n.rfind("step-", 0) != 0 || n.size() != 13) continue;
    if (!std::all_of(n.begin() + 5, n.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
    found.emplace_back(std::stoll(n.substr(5)), e.path().string());
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(f.second);
  return out;
}

}  // namespace moex
