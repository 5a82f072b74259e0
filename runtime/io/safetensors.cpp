// safetensors reading (with a validating header parser) and writing.
#include "runtime/io/safetensors.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "runtime/io/checkpoint_files.h"
#include "runtime/io/json_guard.h"

namespace moex {
namespace {
static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian; moex assumes a little-endian host");

using nlohmann::json;

/// Bytes per element of a safetensors dtype, or 0 when unknown.
std::uint64_t dtype_size(const std::string& d) {
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  if (d == "I8" || d == "U8" || d == "BOOL" || d == "F8_E4M3" || d == "F8_E5M2") return 1;
  return 0;
}

}  // namespace

float fp8_e4m3_to_float(std::uint8_t b) {
  // E4M3 "fn" (PyTorch's float8_e4m3fn, DeepSeek-V3's weights): 1 sign, 4 exponent (bias 7), 3
  // mantissa bits; no infinities, S.1111.111 is NaN; exponent 0 is subnormal (m/8 * 2^-6).
  const int e = (b >> 3) & 0xf, m = b & 7;
  const float sign = (b & 0x80) ? -1.0f : 1.0f;
  if (e == 0xf && m == 7) return std::numeric_limits<float>::quiet_NaN();
  if (e == 0) return sign * std::ldexp(static_cast<float>(m) / 8.0f, -6);
  return sign * std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
}

namespace {

float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  const std::uint32_t bits = exp == 31 ? (sign | 0x7f800000u | (mant << 13)) : (sign | ((exp + 112) << 23) | (mant << 13));
  return std::bit_cast<float>(bits);
}

/// The header, parsed in linear time with its depth bounded and duplicate keys (which nlohmann::json
/// would silently merge) refused (json_guard.h).
json parse_header(const std::string& text, const std::string& path) {
  return parse_json_guarded(text, "safetensors " + path + ": header");
}
}  // namespace

std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

std::int64_t SafetensorsEntry::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

SafetensorsFile SafetensorsFile::open(const std::string& path, const SafetensorsLimits& limits) {
  check_regular_file(path, "safetensors file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("cannot open safetensors file " + path + ": " + std::strerror(errno));
  std::error_code ec;
  const std::uint64_t file_size = std::filesystem::file_size(path, ec);
  if (ec) throw IoError("cannot stat safetensors file " + path + ": " + ec.message());
  return parse(path, file_size, limits, [&](std::uint64_t at, char* to, std::uint64_t n) {
    in.seekg(static_cast<std::streamoff>(at));
    return static_cast<bool>(in.read(to, static_cast<std::streamsize>(n)));
  });
}

SafetensorsFile SafetensorsFile::from_bytes(FileBytes bytes, const std::string& path, const SafetensorsLimits& limits) {
  if (!bytes.data) throw InvalidArgument("SafetensorsFile::from_bytes(" + path + "): no bytes");
  const std::string_view b = bytes.view();
  SafetensorsFile f = parse(path, b.size(), limits, [&](std::uint64_t at, char* to, std::uint64_t n) {
    if (at > b.size() || n > b.size() - at) return false;
    std::memcpy(to, b.data() + at, static_cast<std::size_t>(n));
    return true;
  });
  f.bytes_ = std::move(bytes);
  return f;
}

SafetensorsFile SafetensorsFile::parse(const std::string& path, std::uint64_t file_size, const SafetensorsLimits& limits,
                                       const std::function<bool(std::uint64_t, char*, std::uint64_t)>& read) {
  auto fail = [&](const std::string& why) -> IoError { return IoError("safetensors " + path + ": " + why); };
  if (file_size > limits.max_file_bytes)
    throw fail("file is " + std::to_string(file_size) + " bytes, over the limit of " + std::to_string(limits.max_file_bytes));
  if (file_size < 8) throw fail("file is " + std::to_string(file_size) + " bytes, shorter than the 8-byte header length");
  unsigned char len_bytes[8];
  if (!read(0, reinterpret_cast<char*>(len_bytes), 8)) throw fail("cannot read the header length");
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  if (header_len == 0) throw fail("header length is 0");
  if (header_len > limits.max_header_bytes)
    throw fail("header length " + std::to_string(header_len) + " exceeds the limit of " + std::to_string(limits.max_header_bytes) + " bytes");
  if (header_len > file_size - 8)
    throw fail("header length " + std::to_string(header_len) + " runs past the end of the " + std::to_string(file_size) +
               "-byte file (truncated?)");
  std::string text(static_cast<std::size_t>(header_len), '\0');
  if (!read(8, text.data(), header_len)) throw fail("cannot read the header");
  const json header = parse_header(text, path);
  if (!header.is_object()) throw fail("header is not a JSON object");

  SafetensorsFile f;
  f.path_ = path;
  f.data_offset_ = 8 + header_len;
  const std::uint64_t data_size = file_size - f.data_offset_;
  for (const auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      if (!v.is_object()) throw fail("__metadata__ is not an object");
      for (const auto& [k, mv] : v.items()) {
        if (!mv.is_string()) throw fail("__metadata__ value of '" + k + "' is not a string");
        f.metadata_[k] = mv.get<std::string>();
      }
      continue;
    }
    const std::string& tensor = name;  // (a structured binding cannot be captured before C++20 everywhere)
    auto bad = [&](const std::string& why) { return fail("tensor '" + tensor + "': " + why); };
    if (!v.is_object()) throw bad("entry is not an object");
    if (!v.contains("dtype") || !v["dtype"].is_string()) throw bad("missing string field 'dtype'");
    if (!v.contains("shape") || !v["shape"].is_array()) throw bad("missing array field 'shape'");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
      throw bad("missing field 'data_offsets' = [begin, end]");
    SafetensorsEntry e;
    e.name = name;
    e.dtype = v["dtype"].get<std::string>();
    const std::uint64_t esize = dtype_size(e.dtype);
    if (esize == 0) throw bad("unknown dtype '" + e.dtype + "'");
    if (static_cast<std::int64_t>(v["shape"].size()) > limits.max_rank)
      throw bad("rank " + std::to_string(v["shape"].size()) + " exceeds the limit of " + std::to_string(limits.max_rank));
    std::uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_integer() || d.get<std::int64_t>() < 0) throw bad("shape " + v["shape"].dump() + " has a dimension that is not a non-negative integer");
      const auto dim = d.get<std::uint64_t>();
      if (dim != 0 && numel > std::numeric_limits<std::uint64_t>::max() / dim / esize) throw bad("shape " + v["shape"].dump() + " overflows");
      numel *= dim;
      e.shape.push_back(static_cast<std::int64_t>(dim));
    }
    for (const auto& o : v["data_offsets"])
      if (!o.is_number_integer() || o.get<std::int64_t>() < 0) throw bad("data_offsets " + v["data_offsets"].dump() + " are not non-negative integers");
    e.begin = v["data_offsets"][0].get<std::uint64_t>();
    e.end = v["data_offsets"][1].get<std::uint64_t>();
    if (e.begin > e.end) throw bad("data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "] begin after they end");
    if (e.end > data_size)
      throw bad("data_offsets end " + std::to_string(e.end) + " lies past the data section (" + std::to_string(data_size) + " bytes)");
    if (e.end - e.begin != numel * esize)
      throw bad("data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "] hold " + std::to_string(e.end - e.begin) +
                " bytes but dtype " + e.dtype + " x shape " + shape_str(e.shape) + " needs " + std::to_string(numel * esize));
    f.entries_.emplace(name, std::move(e));
  }
  // Tensors must tile the data section exactly: no gaps, no overlap, nothing left over.
  std::vector<const SafetensorsEntry*> order;
  for (const auto& [n, e] : f.entries_) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
  std::uint64_t at = 0;
  for (const auto* e : order) {
    if (e->begin != at)
      throw fail("tensor '" + e->name + "' starts at byte " + std::to_string(e->begin) + " but the previous tensor ends at " +
                 std::to_string(at) + " (tensors must be contiguous, without gaps or overlap)");
    at = e->end;
  }
  if (at != data_size)
    throw fail("tensors cover " + std::to_string(at) + " bytes but the data section holds " + std::to_string(data_size) +
               " (trailing bytes or a truncated file)");
  return f;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  const auto it = entries_.find(name);
  if (it != entries_.end()) return it->second;
  // Hint at names under the same first component (e.g. "model.") so a wrong --prefix is obvious.
  const std::string first = name.substr(0, name.find('.'));
  std::string hint;
  int shown = 0;
  for (auto e = entries_.lower_bound(first); e != entries_.end() && e->first.rfind(first, 0) == 0 && shown < 5; ++e)
    hint += (shown++ ? ", " : "; it has e.g. ") + e->first;
  throw IoError("tensor '" + name + "' missing from " + path_ + hint);
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [n, e] : entries_) out.push_back(n);
  return out;
}

std::vector<float> SafetensorsFile::read_f32(const std::string& name, const std::vector<std::int64_t>& expected_shape) const {
  const SafetensorsEntry& e = entry(name);
  if (!expected_shape.empty() && e.shape != expected_shape)
    throw IoError(path_ + ": tensor '" + name + "' has shape " + shape_str(e.shape) + ", expected " + shape_str(expected_shape));
  if (e.dtype != "F32" && e.dtype != "BF16" && e.dtype != "F16" && e.dtype != "F64" && e.dtype != "F8_E4M3")
    throw IoError(path_ + ": tensor '" + name + "' has dtype " + e.dtype +
                  "; expected a floating type (F32, BF16, F16, F64, F8_E4M3)");
  // The tensor's bytes: in memory (from_bytes; open() checked they lie inside), or read now.
  std::vector<char> read;
  const char* raw = nullptr;
  if (bytes_.data) {
    raw = bytes_.data.get() + data_offset_ + e.begin;
  } else {
    std::ifstream in(path_, std::ios::binary);
    if (!in) throw IoError("cannot reopen safetensors file " + path_ + ": " + std::strerror(errno));
    read.resize(static_cast<std::size_t>(e.end - e.begin));
    in.seekg(static_cast<std::streamoff>(data_offset_ + e.begin));
    if (!read.empty() && !in.read(read.data(), static_cast<std::streamsize>(read.size())))
      throw IoError(path_ + ": short read of tensor '" + name + "' (file changed or truncated?)");
    raw = read.data();
  }
  const auto n = static_cast<std::size_t>(e.numel());
  std::vector<float> out(n);
  if (e.dtype == "F32") {
    if (n > 0) std::memcpy(out.data(), raw, n * 4);  // (memcpy of null pointers is undefined even for 0 bytes)
  } else if (e.dtype == "F8_E4M3") {
    for (std::size_t i = 0; i < n; ++i) out[i] = fp8_e4m3_to_float(static_cast<std::uint8_t>(raw[i]));
  } else if (e.dtype == "F64") {
    for (std::size_t i = 0; i < n; ++i) {
      double d;
      std::memcpy(&d, raw + i * 8, 8);
      out[i] = static_cast<float>(d);
    }
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      std::uint16_t h;
      std::memcpy(&h, raw + i * 2, 2);
      out[i] = e.dtype == "BF16" ? std::bit_cast<float>(static_cast<std::uint32_t>(h) << 16) : half_to_float(h);
    }
  }
  return out;
}

std::string write_safetensors(const std::string& path, const std::vector<TensorView>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<const TensorView*> order;
  std::set<std::string> seen;
  for (const auto& t : tensors) {
    if (!seen.insert(t.name).second) throw InvalidArgument("write_safetensors: tensor '" + t.name + "' given twice");
    std::int64_t numel = 1;
    for (auto d : t.shape) {
      if (d < 0) throw InvalidArgument("write_safetensors: tensor '" + t.name + "' has a negative dimension in " + shape_str(t.shape));
      numel *= d;
    }
    if (t.numel != numel)
      throw InvalidArgument("write_safetensors: tensor '" + t.name + "' has " + std::to_string(t.numel) +
                            " values but shape " + shape_str(t.shape) + " needs " + std::to_string(numel));
    if (numel > 0 && t.data == nullptr) throw InvalidArgument("write_safetensors: tensor '" + t.name + "' has no data");
    order.push_back(&t);
  }
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->name < b->name; });
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t at = 0;
  for (const auto* t : order) {
    const std::uint64_t bytes = static_cast<std::uint64_t>(t->numel) * 4;
    header[t->name] = {{"dtype", "F32"}, {"shape", t->shape}, {"data_offsets", {at, at + bytes}}};
    at += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  check_atomic_target(path);
  const std::string tmp = path + ".tmp";
  Checksum sum;
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw IoError("cannot write " + tmp + ": " + std::strerror(errno));
    auto put = [&](const void* p, std::size_t n) {
      out.write(static_cast<const char*>(p), static_cast<std::streamsize>(n));
      sum.update(p, n);
    };
    unsigned char len[8];
    std::uint64_t n = text.size();
    for (int i = 0; i < 8; ++i, n >>= 8) len[i] = static_cast<unsigned char>(n & 0xff);
    put(len, 8);
    put(text.data(), text.size());
    for (const auto* t : order) put(t->data, static_cast<std::size_t>(t->numel) * 4);
    out.flush();
    if (!out) throw IoError("writing " + tmp + " failed: " + std::strerror(errno));
  }
  commit_file(tmp, path);
  return sum.hex();
}

void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<TensorView> views;
  views.reserve(tensors.size());
  for (const auto& t : tensors)
    views.push_back({t.name, t.shape, t.data.data(), static_cast<std::int64_t>(t.data.size())});
  write_safetensors(path, views, metadata);
}

}  // namespace moex
