// Argument checks and message helpers shared by the Communicator backends.
#include "comm/op_checks.h"

#include <sstream>

#include "base/error.h"

namespace moex::comm::op_checks {

void require_count(std::int64_t value, const std::string& op, const std::string& what) {
  if (value < 0) throw InvalidArgument(op + ": " + what + " = " + std::to_string(value) + " must be >= 0");
}

void require_buffer(const void* buffer, std::int64_t elements, const std::string& op, const char* what) {
  if (buffer == nullptr && elements > 0) {
    throw InvalidArgument(op + ": " + what + " is null but " + std::to_string(elements) +
                          " elements would move through it; a null buffer is allowed only with zero counts");
  }
}

void require_root(int root, int size, const std::string& op) {
  if (root < 0 || root >= size) {
    throw InvalidArgument(op + ": root = " + std::to_string(root) + " is not a rank of this communicator (0.." +
                          std::to_string(size - 1) + ")");
  }
}

std::vector<std::int64_t> per_peer(std::span<const std::int64_t> values, int size, const std::string& op,
                                   const char* what) {
  if (values.size() != static_cast<std::size_t>(size)) {
    throw InvalidArgument(op + ": " + what + " has " + std::to_string(values.size()) +
                          " entries; expected one per rank (" + std::to_string(size) + ")");
  }
  std::vector<std::int64_t> out(values.begin(), values.end());
  for (std::size_t p = 0; p < out.size(); ++p) require_count(out[p], op, std::string(what) + "[" + std::to_string(p) + "]");
  return out;
}

std::vector<std::int64_t> packed(const std::vector<std::int64_t>& counts) {
  std::vector<std::int64_t> displs(counts.size());
  std::int64_t at = 0;
  for (std::size_t p = 0; p < counts.size(); ++p) {
    displs[p] = at;
    at += counts[p];
  }
  return displs;
}

std::string peer_list(int self, int size) {
  std::vector<int> peers;
  for (int p = 0; p < size; ++p)
    if (p != self) peers.push_back(p);
  if (peers.empty()) return "none";
  std::ostringstream os;
  for (std::size_t i = 0; i < peers.size();) {
    std::size_t j = i;
    while (j + 1 < peers.size() && peers[j + 1] == peers[j] + 1) ++j;
    if (i > 0) os << ",";
    if (j - i >= 2) {
      os << peers[i] << "-" << peers[j];
    } else {
      for (std::size_t k = i; k <= j; ++k) os << (k > i ? "," : "") << peers[k];
    }
    i = j + 1;
  }
  return os.str();
}

}  // namespace moex::comm::op_checks
