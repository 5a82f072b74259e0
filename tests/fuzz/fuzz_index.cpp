// libFuzzer target: any bytes as a model.safetensors.index.json beside one valid shard
// (a.safetensors) in a private folder: HfCheckpoint::open, moe_prefixes and read_weight of what it
// names. Only moex::Error may come out.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include "base/error.h"
#include "runtime/io/hf_checkpoint.h"

namespace {
std::string folder() {
  static const std::string dir = [] {
    const std::string d = "/dev/shm/moex_fuzz_index_" + std::to_string(::getpid());
    std::filesystem::create_directories(d);
    moex::write_safetensors(d + "/a.safetensors", {{"model.layers.1.mlp.gate.weight", {2, 2}, {1, 2, 3, 4}},
                                                   {"w", {2}, {5, 6}}});
    return d;
  }();
  return dir;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string dir = folder(), index = dir + "/model.safetensors.index.json";
  {
    std::ofstream out(index, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  try {
    const auto c = moex::HfCheckpoint::open(index);
    c.moe_prefixes();
    for (const auto& n : c.names()) {
      try {
        c.read_weight(n);
      } catch (const moex::Error&) {
      }
    }
  } catch (const moex::Error&) {
  }
  return 0;
}
