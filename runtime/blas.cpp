// CBLAS calls and OpenBLAS kernel selection.
#include "runtime/blas.h"

#include <cblas.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>

#include "base/error.h"

namespace moex::blas {
namespace {
int checked_int(std::int64_t v, const char* what) {
  if (v < 0 || v > std::numeric_limits<int>::max())
    throw InvalidArgument(std::string("sgemm: ") + what + " = " + std::to_string(v) +
                          " is out of the BLAS int range [0, 2^31)");
  return static_cast<int>(v);
}

/// The best OpenBLAS kernel family for this CPU's instruction sets (x86-64), else "".
std::string best_core_for_cpu() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool skx = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (!skx) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? "Haswell" : "";
#if defined(__GNUC__) && __GNUC__ >= 12
  if (__builtin_cpu_supports("avx512bf16")) return "Cooperlake";
#endif
  return "SkylakeX";
#else
  return "";
#endif
}
}  // namespace

void sgemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
           const float* a, std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c,
           std::int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              checked_int(m, "m"), checked_int(n, "n"), checked_int(k, "k"), alpha, a,
              checked_int(lda, "lda"), b, checked_int(ldb, "ldb"), beta, c, checked_int(ldc, "ldc"));
}

void set_num_threads(int threads) {
#if MOEX_HAVE_OPENBLAS_API
  openblas_set_num_threads(threads < 1 ? 1 : threads);
#else
  (void)threads;
#endif
}

std::string kernel_name() {
#if MOEX_HAVE_OPENBLAS_API
  const char* name = openblas_get_corename();
  return name ? name : "unknown";
#else
  return "unknown";
#endif
}

int core_generation(const std::string& name) {
  // OpenBLAS's x86-64 families by the widest kernels they run: SSE, AVX, AVX2 (Zen runs the Haswell
  // kernels), AVX-512, AVX-512 with BF16.
  static const std::pair<const char*, int> kFamilies[] = {
      {"prescott", 0},   {"core2", 0},      {"penryn", 0},     {"dunnington", 0},  {"nehalem", 0},
      {"atom", 0},       {"opteron", 0},    {"barcelona", 0},  {"bobcat", 0},      {"sandybridge", 1},
      {"bulldozer", 1},  {"piledriver", 1}, {"steamroller", 1}, {"excavator", 1},  {"haswell", 2},
      {"zen", 2},        {"skylakex", 3},   {"cooperlake", 4}, {"sapphirerapids", 4}};
  std::string lower(name);
  for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  for (const auto& [family, generation] : kFamilies)
    if (lower == family) return generation;
  return -1;
}

std::string faster_core(const std::string& current, const std::string& best) {
  const int have = core_generation(current), can = core_generation(best);
  return have >= 0 && can > have ? best : std::string();
}

void select_fast_kernels(char** argv) {
  const char* keep = std::getenv("MOEX_KEEP_BLAS_CORETYPE");
  if (keep && std::strcmp(keep, "1") == 0) return;
  if (std::getenv("MOEX_BLAS_REEXECUTED")) return;  // never loop
  // The family OpenBLAS runs: the one OPENBLAS_CORETYPE forces, or its own pick, which falls back to
  // its oldest kernels (Prescott: SSE3) on a CPU model newer than the library.
  const char* forced = std::getenv("OPENBLAS_CORETYPE");
  const std::string current = forced && *forced ? std::string(forced) : kernel_name();
  const std::string best = faster_core(current, best_core_for_cpu());
  if (best.empty()) return;
  const char* world_rank = std::getenv("OMPI_COMM_WORLD_RANK");
  if (!world_rank || std::strcmp(world_rank, "0") == 0) {
    if (forced && *forced)
      std::fprintf(stderr,
                   "moex: OPENBLAS_CORETYPE=%s forces older BLAS kernels than this CPU supports; "
                   "re-running with OPENBLAS_CORETYPE=%s (MOEX_KEEP_BLAS_CORETYPE=1 keeps yours)\n",
                   forced, best.c_str());
    else
      std::fprintf(stderr,
                   "moex: OpenBLAS picked its %s kernels, older than this CPU supports (it does not know "
                   "this CPU model); re-running with OPENBLAS_CORETYPE=%s (MOEX_KEEP_BLAS_CORETYPE=1 keeps "
                   "OpenBLAS's pick)\n",
                   current.c_str(), best.c_str());
  }
  setenv("OPENBLAS_CORETYPE", best.c_str(), 1);
  setenv("MOEX_BLAS_REEXECUTED", "1", 1);
  execv("/proc/self/exe", argv);
  std::fprintf(stderr, "moex: re-exec for faster BLAS kernels failed (%s); continuing with %s\n",
               std::strerror(errno), current.c_str());
}

}  // namespace moex::blas
