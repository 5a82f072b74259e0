// Backend-independent helpers of the Communicator interface: element sizes and the timeout setting.
#include "comm/communicator.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <string>

#include "base/error.h"

namespace moex::comm {

std::size_t element_size(DataType type) {
  switch (type) {
    case DataType::kFloat32: return 4;
    case DataType::kFloat64: return 8;
    case DataType::kInt32: return 4;
    case DataType::kInt64: return 8;
    case DataType::kByte: return 1;
  }
  throw InvalidArgument("element_size: DataType " + std::to_string(static_cast<int>(type)) +
                        " is not one of float32, float64, int32, int64, byte");
}

std::optional<std::chrono::milliseconds> timeout_from_seconds(double seconds) {
  if (!std::isfinite(seconds) || seconds <= 0.0 || seconds > kMaxTimeoutSeconds) return std::nullopt;
  return std::chrono::milliseconds(static_cast<std::int64_t>(std::ceil(seconds * 1000.0)));
}

std::chrono::milliseconds timeout_from_env(std::chrono::milliseconds fallback) {
  const char* text = std::getenv("MOEX_TIMEOUT_S");
  if (text == nullptr) return fallback;
  char* end = nullptr;
  errno = 0;
  const double seconds = std::strtod(text, &end);
  const bool parsed = end != text && *end == '\0' && errno != ERANGE;
  const auto timeout = parsed ? timeout_from_seconds(seconds) : std::nullopt;
  if (!timeout)
    throw ConfigError(std::string("MOEX_TIMEOUT_S='") + text + "': expected a positive number of seconds");
  return *timeout;
}

}  // namespace moex::comm
