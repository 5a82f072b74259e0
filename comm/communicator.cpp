// Communicator helpers shared by every backend.
#include "comm/communicator.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

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
  throw InvalidArgument("element_size: unknown DataType " + std::to_string(static_cast<int>(type)));
}

std::chrono::milliseconds timeout_from_env(std::chrono::milliseconds fallback) {
  const char* v = std::getenv("MOEX_TIMEOUT_S");
  if (!v) return fallback;
  char* end = nullptr;
  errno = 0;
  const double s = std::strtod(v, &end);
  if (*v == '\0' || *end != '\0' || errno == ERANGE || !std::isfinite(s) || s <= 0.0 || s > 1e7)
    throw ConfigError(std::string("MOEX_TIMEOUT_S='") + v + "': expected a positive number of seconds");
  return std::chrono::milliseconds(static_cast<std::int64_t>(std::ceil(s * 1000.0)));
}

}  // namespace moex::comm
