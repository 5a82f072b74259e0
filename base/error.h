// Error types and invariant checks shared by every moex library.
#pragma once

#include <atomic>
#include <sstream>
#include <stdexcept>
#include <string>

namespace moex {

/// The rank of this process, or -1 before a communicator has been created. Used to prefix messages.
inline std::atomic<int>& process_rank_slot() {
  static std::atomic<int> rank{-1};
  return rank;
}
inline int process_rank() { return process_rank_slot().load(std::memory_order_relaxed); }
inline void set_process_rank(int rank) { process_rank_slot().store(rank, std::memory_order_relaxed); }

/// "[rank 3] " once the rank is known, "" before.
inline std::string rank_prefix() {
  const int r = process_rank();
  return r < 0 ? std::string() : "[rank " + std::to_string(r) + "] ";
}

/// Base of every moex exception: a failure the caller can act on. The message names what failed,
/// the value, and what is expected.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(rank_prefix() + what), message_(what) {}
  /// The message without the rank prefix (for wrapping it in another error).
  const std::string& message() const { return message_; }

 private:
  std::string message_;
};

/// A configuration value broke a rule (field, value and rule are in the message).
class ConfigError : public Error { using Error::Error; };
/// A file could not be read or is malformed (path and reason in the message).
class IoError : public Error { using Error::Error; };
/// An MPI call failed (call, MPI's own error string, rank).
class MpiError : public Error { using Error::Error; };
/// A wait passed its deadline (op, rank, peers in the message).
class TimeoutError : public Error { using Error::Error; };
/// A CUDA runtime / cuBLAS call failed.
class CudaError : public Error { using Error::Error; };
/// An NCCL call failed.
class NcclError : public Error { using Error::Error; };
/// Bad arguments to an API (shape mismatch, out-of-range index).
class InvalidArgument : public Error { using Error::Error; };
/// A broken internal invariant: a bug in moex, not in the caller's input.
class InternalError : public Error { using Error::Error; };

namespace detail {
template <typename A, typename B>
[[noreturn]] void check_failed(const char* file, int line, const char* expr, const A& a, const B& b) {
  std::ostringstream os;
  os << file << ":" << line << ": check failed: " << expr << " (a=" << a << " b=" << b << ")";
  throw InternalError(os.str());
}
[[noreturn]] inline void check_failed(const char* file, int line, const char* expr) {
  std::ostringstream os;
  os << file << ":" << line << ": check failed: " << expr;
  throw InternalError(os.str());
}
}  // namespace detail
}  // namespace moex

/// Invariant checks: on failure throw moex::InternalError printing both values.
#define MOEX_CHECK(cond) \
  do { if (!(cond)) ::moex::detail::check_failed(__FILE__, __LINE__, #cond); } while (0)
#define MOEX_CHECK_OP_(a, b, op)                                                     \
  do {                                                                                \
    const auto& moex_a_ = (a);                                                        \
    const auto& moex_b_ = (b);                                                        \
    if (!(moex_a_ op moex_b_))                                                        \
      ::moex::detail::check_failed(__FILE__, __LINE__, #a " " #op " " #b, moex_a_, moex_b_); \
  } while (0)
#define MOEX_CHECK_EQ(a, b) MOEX_CHECK_OP_(a, b, ==)
#define MOEX_CHECK_NE(a, b) MOEX_CHECK_OP_(a, b, !=)
#define MOEX_CHECK_LT(a, b) MOEX_CHECK_OP_(a, b, <)
#define MOEX_CHECK_LE(a, b) MOEX_CHECK_OP_(a, b, <=)
#define MOEX_CHECK_GE(a, b) MOEX_CHECK_OP_(a, b, >=)
