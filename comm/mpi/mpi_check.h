// MOEX_MPI_CHECK: the one checking macro for MPI calls (private to the MPI backend).
#pragma once

#include <mpi.h>

#include <string>

#include "base/error.h"

namespace moex::comm::detail {

/// "rank N" for this process: the recorded rank, else MPI_COMM_WORLD's rank while MPI is usable.
inline std::string mpi_rank_text() {
  int rank = process_rank();
  if (rank < 0) {
    int initialized = 0;
    int finalized = 0;
    if (MPI_Initialized(&initialized) == MPI_SUCCESS && initialized &&
        MPI_Finalized(&finalized) == MPI_SUCCESS && !finalized &&
        MPI_Comm_rank(MPI_COMM_WORLD, &rank) != MPI_SUCCESS) {
      rank = -1;
    }
  }
  return rank < 0 ? std::string("rank unknown") : "rank " + std::to_string(rank);
}

/// MPI's own text for error `code` (falls back to the number when MPI cannot describe it).
inline std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS || len <= 0) return "MPI error code " + std::to_string(code);
  return std::string(text, static_cast<std::size_t>(len));
}

/// The message of the MpiError for a failed call: site, call text, rank and MPI's error string.
inline std::string mpi_failure_message(int code, const char* call, const char* file, int line) {
  return std::string(file) + ":" + std::to_string(line) + ": " + call + " failed on " + mpi_rank_text() + ": " +
         mpi_error_text(code);
}

/// Throws the MpiError for a failed call.
[[noreturn]] inline void mpi_failed(int code, const char* call, const char* file, int line) {
  throw MpiError(mpi_failure_message(code, call, file, line));
}

}  // namespace moex::comm::detail

/// Runs an MPI call; unless it returns MPI_SUCCESS, throws moex::MpiError naming the call, the
/// site, the rank and MPI's error string. Needs MPI_ERRORS_RETURN on the communicator involved.
#define MOEX_MPI_CHECK(call)                                                                      \
  do {                                                                                            \
    const int moex_mpi_rc_ = (call);                                                              \
    if (moex_mpi_rc_ != MPI_SUCCESS)                                                              \
      ::moex::comm::detail::mpi_failed(moex_mpi_rc_, #call, __FILE__, __LINE__);                  \
  } while (0)
