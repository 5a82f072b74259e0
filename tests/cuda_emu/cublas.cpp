// The cuBLAS calls the GPU path makes, emulated (see emu.h): handles, streams, cublasGemmEx and
// cublasGemmGroupedBatchedEx. Column-major, C = alpha op(A) op(B) + beta C with fp32 accumulation
// in k order; beta == 0 does not read C (as cuBLAS). Arguments are checked as cuBLAS checks them
// (CUBLAS_STATUS_INVALID_VALUE / NOT_SUPPORTED at the call); operands are checked against their
// device allocations when the GEMM runs (a fault, like a device memory error).
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cuda_emu/emu.h"

struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
};

namespace moex_emu {
namespace {

float load(const void* base, std::size_t i, cudaDataType_t t) {
  if (t == CUDA_R_32F) return static_cast<const float*>(base)[i];
  return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
}
void store(void* base, std::size_t i, cudaDataType_t t, float v) {
  if (t == CUDA_R_32F)
    static_cast<float*>(base)[i] = v;
  else
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
}
std::size_t type_size(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

struct Gemm {
  cublasOperation_t ta, tb;
  int m, n, k;
  float alpha, beta;
  const void* a;
  int lda;
  const void* b;
  int ldb;
  void* c;
  int ldc;
};

bool valid_op(cublasOperation_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T; }

/// cuBLAS's argument rules for one problem; an empty string when they hold.
std::string check_args(const Gemm& g) {
  if (!valid_op(g.ta) || !valid_op(g.tb)) return "transpose must be CUBLAS_OP_N or CUBLAS_OP_T";
  if (g.m < 0 || g.n < 0 || g.k < 0) return "negative m, n or k";
  const int a_rows = g.ta == CUBLAS_OP_N ? g.m : g.k, b_rows = g.tb == CUBLAS_OP_N ? g.k : g.n;
  if (g.lda < std::max(1, a_rows))
    return "lda " + std::to_string(g.lda) + " < rows of A as stored (" + std::to_string(a_rows) + ")";
  if (g.ldb < std::max(1, b_rows))
    return "ldb " + std::to_string(g.ldb) + " < rows of B as stored (" + std::to_string(b_rows) + ")";
  if (g.ldc < std::max(1, g.m)) return "ldc " + std::to_string(g.ldc) + " < m (" + std::to_string(g.m) + ")";
  return {};
}

/// Checks that an operand of `rows` x `cols` (column-major, leading dimension `ld`) lies in one
/// device allocation.
bool operand_ok(const char* what, const void* p, int rows, int cols, int ld, cudaDataType_t t, std::string* why) {
  if (rows == 0 || cols == 0) return true;
  const std::size_t elems = static_cast<std::size_t>(ld) * static_cast<std::size_t>(cols - 1) +
                            static_cast<std::size_t>(rows);
  bool is_device = false;
  std::string w;
  if (device_range_ok(p, elems * type_size(t), &is_device, &w)) return true;
  *why = std::string("operand ") + what + " (" + std::to_string(rows) + " x " + std::to_string(cols) + ", ld " +
         std::to_string(ld) + "): " + (is_device ? w : "not device memory");
  return false;
}

/// Runs one GEMM (on the stream, at run time).
/// Output size (m * n) from which run_gemm sums k in two halves (see there).
constexpr long long kSplitElems = 1536;

void run_gemm(const Gemm& g, cudaDataType_t at, cudaDataType_t bt, cudaDataType_t ct, const std::string& api) {
  if (g.m == 0 || g.n == 0) return;
  std::string why;
  const bool na = g.ta == CUBLAS_OP_N, nb = g.tb == CUBLAS_OP_N;
  if ((g.k > 0 && (!operand_ok("A", g.a, na ? g.m : g.k, na ? g.k : g.m, g.lda, at, &why) ||
                   !operand_ok("B", g.b, nb ? g.k : g.n, nb ? g.n : g.k, g.ldb, bt, &why))) ||
      !operand_ok("C", g.c, g.m, g.n, g.ldc, ct, &why)) {
    fault(api + ": " + why);
    return;
  }
  // op(A) as m rows of k and op(B)^T as n rows of k, in fp32, so the dot products run contiguously.
  // Like cuBLAS, which picks its kernel (tiling, split-K) by shape, a row's bits depend on the call:
  // for an output of at least kSplitElems elements the k sum runs as two halves added at the end,
  // else in k order. So code
  // that needs a row's result independent of how rows are batched (the deterministic mode) cannot
  // pass here by relying on cuBLAS.
  std::vector<float> a(static_cast<std::size_t>(g.m) * g.k), b(static_cast<std::size_t>(g.n) * g.k);
  for (int i = 0; i < g.m; ++i)
    for (int l = 0; l < g.k; ++l)
      a[static_cast<std::size_t>(i) * g.k + l] =
          load(g.a, na ? i + static_cast<std::size_t>(l) * g.lda : l + static_cast<std::size_t>(i) * g.lda, at);
  for (int j = 0; j < g.n; ++j)
    for (int l = 0; l < g.k; ++l)
      b[static_cast<std::size_t>(j) * g.k + l] =
          load(g.b, nb ? l + static_cast<std::size_t>(j) * g.ldb : j + static_cast<std::size_t>(l) * g.ldb, bt);
  for (int j = 0; j < g.n; ++j)
    for (int i = 0; i < g.m; ++i) {
      const float* ar = a.data() + static_cast<std::size_t>(i) * g.k;
      const float* br = b.data() + static_cast<std::size_t>(j) * g.k;
      const int split = static_cast<long long>(g.m) * g.n >= kSplitElems ? g.k / 2 : g.k;
      float acc = 0.0f, acc2 = 0.0f;
      for (int l = 0; l < split; ++l) acc += ar[l] * br[l];
      for (int l = split; l < g.k; ++l) acc2 += ar[l] * br[l];
      acc += acc2;
      const std::size_t ci = static_cast<std::size_t>(i) + static_cast<std::size_t>(j) * g.ldc;
      float out = g.alpha * acc;
      if (g.beta != 0.0f) out += g.beta * load(g.c, ci, ct);
      store(g.c, ci, ct, out);
    }
}

bool fp32_compute(cublasComputeType_t c) {
  return c == CUBLAS_COMPUTE_32F || c == CUBLAS_COMPUTE_32F_FAST_16BF || c == CUBLAS_COMPUTE_32F_FAST_TF32 ||
         c == CUBLAS_COMPUTE_32F_PEDANTIC;
}

cublasStatus_t reject(cublasStatus_t st, const std::string& message) {
  std::fprintf(stderr, "moex CUDA emulator: %s\n", message.c_str());
  return st;
}

}  // namespace
}  // namespace moex_emu

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) return CUBLAS_STATUS_NOT_INITIALIZED;
  *handle = new cublasContext();
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t mode) {
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->pointer_mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

const char* cublasGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    default: return "CUBLAS_STATUS_UNKNOWN";
  }
}

const char* cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    default: return "unknown status";
  }
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t /*algo*/) {
  using namespace moex_emu;
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (handle->pointer_mode != CUBLAS_POINTER_MODE_HOST)
    return reject(CUBLAS_STATUS_NOT_SUPPORTED, "cublasGemmEx: the emulator supports host pointer mode only");
  const bool types_ok = fp32_compute(computeType) &&
                        ((Atype == CUDA_R_32F && Btype == CUDA_R_32F && Ctype == CUDA_R_32F) ||
                        (Atype == CUDA_R_16BF && Btype == CUDA_R_16BF &&
                         (Ctype == CUDA_R_16BF || Ctype == CUDA_R_32F)));
  if (!types_ok) return reject(CUBLAS_STATUS_NOT_SUPPORTED, "cublasGemmEx: unsupported type combination");
  const Gemm g{transa, transb, m, n, k, *static_cast<const float*>(alpha), *static_cast<const float*>(beta),
               A, lda, B, ldb, C, ldc};
  if (const std::string bad = check_args(g); !bad.empty())
    return reject(CUBLAS_STATUS_INVALID_VALUE, "cublasGemmEx: " + bad);
  enqueue(handle->stream, "cublasGemmEx",
          [g, Atype, Btype, Ctype]() { run_gemm(g, Atype, Btype, Ctype, "cublasGemmEx"); });
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t handle, const cublasOperation_t transa_array[],
                                          const cublasOperation_t transb_array[], const int m_array[],
                                          const int n_array[], const int k_array[], const void* alpha_array,
                                          const void* const Aarray[], cudaDataType_t Atype, const int lda_array[],
                                          const void* const Barray[], cudaDataType_t Btype, const int ldb_array[],
                                          const void* beta_array, void* const Carray[], cudaDataType_t Ctype,
                                          const int ldc_array[], int group_count, const int group_size[],
                                          cublasComputeType_t computeType) {
  using namespace moex_emu;
  const char* api = "cublasGemmGroupedBatchedEx";
  if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (handle->pointer_mode != CUBLAS_POINTER_MODE_HOST)
    return reject(CUBLAS_STATUS_NOT_SUPPORTED, std::string(api) + ": the emulator supports host pointer mode only");
  // The documented combinations: A, B and C of one type (fp32, or bf16 with fp32 compute).
  const bool types_ok = fp32_compute(computeType) && Atype == Btype && Btype == Ctype &&
                        (Atype == CUDA_R_32F || Atype == CUDA_R_16BF);
  if (!types_ok) return reject(CUBLAS_STATUS_NOT_SUPPORTED, std::string(api) + ": unsupported type combination");
  if (group_count < 0) return reject(CUBLAS_STATUS_INVALID_VALUE, std::string(api) + ": group_count < 0");
  // Host arrays are read at the call; the device pointer arrays when the work runs.
  std::vector<Gemm> groups;
  std::vector<int> sizes;
  int total = 0;
  for (int g = 0; g < group_count; ++g) {
    if (group_size[g] < 0) return reject(CUBLAS_STATUS_INVALID_VALUE, std::string(api) + ": group_size < 0");
    const Gemm p{transa_array[g], transb_array[g], m_array[g], n_array[g], k_array[g],
                 static_cast<const float*>(alpha_array)[g], static_cast<const float*>(beta_array)[g],
                 nullptr, lda_array[g], nullptr, ldb_array[g], nullptr, ldc_array[g]};
    if (const std::string bad = check_args(p); !bad.empty())
      return reject(CUBLAS_STATUS_INVALID_VALUE, std::string(api) + ": group " + std::to_string(g) + ": " + bad);
    groups.push_back(p);
    sizes.push_back(group_size[g]);
    total += group_size[g];
  }
  if (total == 0) return CUBLAS_STATUS_SUCCESS;
  for (const void* const* table : {static_cast<const void* const*>(Aarray), static_cast<const void* const*>(Barray),
                                   const_cast<const void* const*>(reinterpret_cast<void* const*>(Carray))}) {
    bool is_device = false;
    std::string why;
    if (!device_range_ok(table, sizeof(void*) * static_cast<std::size_t>(total), &is_device, &why))
      return reject(CUBLAS_STATUS_INVALID_VALUE, std::string(api) + ": a pointer array is not " +
                                                     std::to_string(total) + " pointers in device memory" +
                                                     (why.empty() ? "" : ": " + why));
  }
  enqueue(handle->stream, api, [=]() {
    int idx = 0;
    for (std::size_t g = 0; g < groups.size(); ++g)
      for (int i = 0; i < sizes[g]; ++i, ++idx) {
        Gemm p = groups[g];
        p.a = Aarray[idx];
        p.b = Barray[idx];
        p.c = Carray[idx];
        run_gemm(p, Atype, Btype, Ctype, std::string(api) + " (problem " + std::to_string(idx) + ")");
      }
  });
  return CUBLAS_STATUS_SUCCESS;
}
