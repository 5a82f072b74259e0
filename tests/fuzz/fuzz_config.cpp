// libFuzzer target: any bytes as a config.json: parse_json_guarded, then MoeConfig::from_json and
// near_misses. Only moex::Error may come out.
#include <cstddef>
#include <cstdint>
#include <string>

#include "base/error.h"
#include "runtime/io/json_guard.h"
#include "runtime/io/moe_config.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const nlohmann::json j = moex::parse_json_guarded(text, "fuzz config");
    moex::MoeConfig::near_misses(j);
    const moex::MoeConfig c = moex::MoeConfig::from_json(j);
    c.to_json();
  } catch (const moex::Error&) {
  }
  return 0;
}
