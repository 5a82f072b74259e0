// libFuzzer target: any bytes as a safetensors file. SafetensorsFile::open and read_f32 of every
// tensor (bounded) may only succeed or throw moex::Error; a crash, a sanitizer report, another
// exception or a hang is a finding.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "base/error.h"
#include "runtime/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string path = "/dev/shm/moex_fuzz_st_" + std::to_string(::getpid()) + ".safetensors";
  if (std::FILE* f = std::fopen(path.c_str(), "wb")) {
    std::fwrite(data, 1, size, f);
    std::fclose(f);
  } else {
    return 0;
  }
  try {
    moex::SafetensorsLimits limits;
    limits.max_header_bytes = 1 << 20;
    const auto file = moex::SafetensorsFile::open(path, limits);
    for (const auto& name : file.names())
      if (file.entry(name).end - file.entry(name).begin <= (1u << 20)) {
        try {
          file.read_f32(name);
        } catch (const moex::Error&) {
        }
      }
  } catch (const moex::Error&) {
  }
  return 0;
}
