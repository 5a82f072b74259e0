// MOEX_MPI_CHECK: the one checking macro for MPI calls.
#pragma once

#include <mpi.h>

#include <cstdio>
#include <string>

#include "base/error.h"

namespace moex::comm::detail {
/// Throws MpiError naming the call, the site and MPI's own message for `code`.
[[noreturn]] inline void mpi_failed(int code, const char* call, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) std::snprintf(text, sizeof text, "MPI error %d", code);
  throw MpiError(std::string(file) + ":" + std::to_string(line) + ": " + call + " failed: " + text);
}
}  // namespace moex::comm::detail

#define MOEX_MPI_CHECK(call)                                                              \
  do {                                                                                    \
    const int moex_mpi_rc_ = (call);                                                      \
    if (moex_mpi_rc_ != MPI_SUCCESS) ::moex::comm::detail::mpi_failed(moex_mpi_rc_, #call, __FILE__, __LINE__); \
  } while (0)
