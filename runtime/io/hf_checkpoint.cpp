// Hugging Face checkpoints: single files, sharded folders, FP8 block dequantisation.
#include "runtime/io/hf_checkpoint.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "base/error.h"
#include "runtime/io/checkpoint_files.h"
#include "runtime/io/json_guard.h"

namespace moex {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
constexpr std::uint64_t kMaxIndexBytes = 64ull << 20;
}  // namespace

HfCheckpoint HfCheckpoint::open(const std::string& path, const SafetensorsLimits& limits) {
  HfCheckpoint c;
  fs::path p(path);
  std::error_code ec;
  if (fs::is_directory(p, ec)) {
    if (fs::exists(p / "model.safetensors.index.json")) {
      p /= "model.safetensors.index.json";
    } else {
      std::vector<fs::path> files;
      for (const auto& e : fs::directory_iterator(p, ec))
        if (e.path().extension() == ".safetensors") files.push_back(e.path());
      if (files.size() != 1)
        throw IoError(path + ": a folder with no model.safetensors.index.json must hold exactly one .safetensors "
                      "file; it holds " + std::to_string(files.size()));
      p = files[0];
    }
  }
  c.path_ = p.string();
  auto add = [&](SafetensorsFile f) {
    c.files_.push_back(std::move(f));
    for (const auto& n : c.files_.back().names()) {
      const auto [it, fresh] = c.where_.emplace(n, c.files_.size() - 1);
      if (!fresh)
        throw IoError(c.path_ + ": tensor '" + n + "' is in two shards (" + c.files_[it->second].path() + ", " +
                      c.files_.back().path() + ")");
    }
  };
  if (p.extension() == ".safetensors") {
    add(SafetensorsFile::open(c.path_, limits));
    return c;
  }
  if (p.extension() != ".json")
    throw IoError(path + ": expected a .safetensors file, a model.safetensors.index.json or a folder holding one");
  if (!fs::exists(p, ec)) throw IoError(path + ": no such file");
  if (fs::file_size(p, ec) > kMaxIndexBytes)
    throw IoError(c.path_ + ": index larger than " + std::to_string(kMaxIndexBytes >> 20) + " MiB");
  const json index = parse_json_guarded(read_file(c.path_), c.path_);
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    throw IoError(c.path_ + ": expected a JSON object with a \"weight_map\" object (tensor -> shard file)");
  std::map<std::string, std::vector<std::string>> by_shard;
  for (const auto& [tensor, shard] : index["weight_map"].items()) {
    if (!shard.is_string())
      throw IoError(c.path_ + ": weight_map[\"" + tensor + "\"] is not a file name string");
    const std::string f = shard.get<std::string>();
    if (f.empty() || f.find('/') != std::string::npos || f.find('\\') != std::string::npos || f == "." || f == "..")
      throw IoError(c.path_ + ": weight_map[\"" + tensor + "\"] = \"" + f +
                    "\": expected a file name in the index's folder (no path)");
    by_shard[f].push_back(tensor);
  }
  if (by_shard.empty()) throw IoError(c.path_ + ": weight_map is empty");
  for (const auto& [f, tensors] : by_shard) {
    const fs::path shard = p.parent_path() / f;
    if (!fs::exists(shard, ec)) throw IoError(c.path_ + " names shard " + f + ", which is missing");
    add(SafetensorsFile::open(shard.string(), limits));
    const SafetensorsFile& opened = c.files_.back();
    for (const auto& t : tensors)
      if (!opened.contains(t)) throw IoError(c.path_ + " puts tensor '" + t + "' in " + f + ", which does not hold it");
  }
  return c;
}

std::vector<std::string> HfCheckpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [n, i] : where_) out.push_back(n);
  return out;
}

const SafetensorsFile& HfCheckpoint::file_of(const std::string& name) const {
  const auto it = where_.find(name);
  if (it == where_.end()) throw IoError("tensor '" + name + "' missing from " + path_);
  return files_[it->second];
}

std::vector<float> HfCheckpoint::read_weight(const std::string& name, const std::vector<std::int64_t>& expected_shape,
                                             std::int64_t block_rows, std::int64_t block_cols) const {
  const SafetensorsFile& f = file_of(name);
  const SafetensorsEntry& e = f.entry(name);
  std::vector<float> w = f.read_f32(name, expected_shape);
  if (e.dtype == "F8_E4M3") {
    if (e.shape.size() != 2)
      throw IoError(f.path() + ": FP8 tensor '" + name + "' has shape " + shape_str(e.shape) +
                    "; block scales need a 2-D weight");
    if (block_rows < 1 || block_cols < 1) throw InvalidArgument("read_weight: FP8 block sizes must be >= 1");
    const std::string base = name.size() > 7 && name.ends_with(".weight") ? name.substr(0, name.size() - 7) : name;
    const std::string sname = base + ".weight_scale_inv";
    if (!contains(sname))
      throw IoError(f.path() + ": FP8 tensor '" + name + "' has no block scale '" + sname + "' in " + path_);
    const std::int64_t M = e.shape[0], N = e.shape[1];
    const std::int64_t R = (M + block_rows - 1) / block_rows, C = (N + block_cols - 1) / block_cols;
    const SafetensorsFile& sf = file_of(sname);
    if (sf.entry(sname).dtype != "F32" && sf.entry(sname).dtype != "BF16")
      throw IoError(sf.path() + ": block scale '" + sname + "' has dtype " + sf.entry(sname).dtype + ", expected F32");
    const std::vector<float> s = sf.read_f32(sname, {R, C});  // IoError names both shapes
    for (std::int64_t i = 0; i < M; ++i) {
      const float* srow = s.data() + (i / block_rows) * C;
      float* row = w.data() + i * N;
      for (std::int64_t j = 0; j < N; ++j) row[j] *= srow[j / block_cols];
    }
  }
  for (std::size_t i = 0; i < w.size(); ++i)
    if (!std::isfinite(w[i]))
      throw IoError(f.path() + ": tensor '" + name + "' holds a non-finite value at element " + std::to_string(i));
  return w;
}

std::vector<std::string> HfCheckpoint::moe_prefixes() const {
  std::vector<std::pair<long long, std::string>> found;
  const std::string head = "model.layers.", tail = ".mlp.gate.weight";
  for (const auto& [n, i] : where_) {
    if (n.rfind(head, 0) != 0 || !n.ends_with(tail) || n.size() <= head.size() + tail.size()) continue;
    const std::string mid = n.substr(head.size(), n.size() - head.size() - tail.size());
    if (mid.empty() || mid.size() > 9 || !std::all_of(mid.begin(), mid.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
      continue;
    found.emplace_back(std::stoll(mid), head + mid + ".mlp.");
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(f.second);
  return out;
}

}  // namespace moex
