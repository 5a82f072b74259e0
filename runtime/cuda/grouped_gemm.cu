// GEMMs of the GPU path: dense and grouped row-major GEMMs over cuBLAS, and the grouped expert FFN.
#include "runtime/cuda/grouped_gemm.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <numeric>
#include <string>
#include <tuple>

#include "base/error.h"
#include "runtime/cuda/kernels.h"
#include "runtime/cuda/launch.h"

namespace moex::cuda {
namespace {

using std::int64_t;

cudaDataType_t cuda_type(DType t) { return t == DType::kFp32 ? CUDA_R_32F : CUDA_R_16BF; }

cublasOperation_t op(bool trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

/// "<what>" or "<what>: problem <i>" (built only when an error is reported).
std::string where(const char* what, std::int64_t index) {
  return index < 0 ? std::string(what) : std::string(what) + ": problem " + std::to_string(index);
}

void check_dim(const char* what, std::int64_t index, const char* field, std::int64_t v, std::int64_t min) {
  if (v < min || v > INT_MAX)
    throw InvalidArgument(where(what, index) + ": " + field + " = " + std::to_string(v) + ": must be in [" +
                          std::to_string(min) + ", INT_MAX] (cuBLAS takes 32-bit sizes)");
}

/// Sizes >= 0 and <= INT_MAX; leading dimensions at least the stored row length (row-major).
/// `index` is the problem's position in a grouped run, -1 for a single GEMM.
void check_problem(const GemmProblem& p, const char* what, std::int64_t index) {
  check_dim(what, index, "m", p.m, 0);
  check_dim(what, index, "n", p.n, 0);
  check_dim(what, index, "k", p.k, 0);
  if (p.m == 0 || p.n == 0) return;
  check_dim(what, index, "ldc", p.ldc, std::max<std::int64_t>(1, p.n));
  if (!p.c) throw InvalidArgument(where(what, index) + ": c is null (expected a device pointer)");
  if (p.k == 0) return;
  check_dim(what, index, "lda", p.lda, std::max<std::int64_t>(1, p.trans_a ? p.m : p.k));
  check_dim(what, index, "ldb", p.ldb, std::max<std::int64_t>(1, p.trans_b ? p.k : p.n));
  if (!p.a || !p.b) throw InvalidArgument(where(what, index) + ": a or b is null (expected device pointers)");
}

/// k == 0: C = beta * C, supported for beta 0 (zero fill) and 1 (nothing to do).
void scale_empty_product(const GemmProblem& p, DType dtype, const char* what, std::int64_t index,
                         cudaStream_t stream) {
  if (p.beta == 1.0f) return;
  if (p.beta != 0.0f)
    throw InvalidArgument(where(what, index) + ": k = 0 with beta = " + std::to_string(p.beta) +
                          ": expected beta 0 or 1");
  const std::size_t es = dtype_size(dtype);
  MOEX_CUDA_CHECK(cudaMemset2DAsync(p.c, static_cast<std::size_t>(p.ldc) * es, 0, static_cast<std::size_t>(p.n) * es,
                                    static_cast<std::size_t>(p.m), stream));
}

/// One validated, non-empty problem through cublasGemmEx. Row-major C = op(A) op(B) is column-major
/// C^T = op(B)^T op(A)^T: cuBLAS gets B first, with m and n swapped.
void gemm_ex(cublasHandle_t blas, DType dtype, const GemmProblem& p) {
  const cudaDataType_t t = cuda_type(dtype);
  MOEX_CUBLAS_CHECK(cublasGemmEx(blas, op(p.trans_b), op(p.trans_a), static_cast<int>(p.n), static_cast<int>(p.m),
                                 static_cast<int>(p.k), &p.alpha, p.b, t, static_cast<int>(p.ldb), p.a, t,
                                 static_cast<int>(p.lda), &p.beta, p.c, t, static_cast<int>(p.ldc), CUBLAS_COMPUTE_32F,
                                 CUBLAS_GEMM_DEFAULT));
}

/// cublasGemmGroupedBatchedEx reads the A / B / C pointers of bf16 problems from device memory and
/// cannot check them, so it requires them aligned (16 bytes covers every case of its rule); a
/// misaligned one faults. Such problems go through cublasGemmEx, which checks on the host.
bool grouped_ok(DType dtype, const GemmProblem& p) {
  if (dtype != DType::kBf16) return true;
  for (const void* ptr : {p.a, p.b, static_cast<const void*>(p.c)})
    if (reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0) return false;
  return true;
}

/// The fields that must agree for two problems to share a cuBLAS group.
auto group_key(const GemmProblem& p) {
  return std::make_tuple(p.trans_a, p.trans_b, p.m, p.n, p.k, p.lda, p.ldb, p.ldc, p.alpha, p.beta);
}

// ---------------------------------------------------------------------------------------------------
// Fixed-order GEMM: a 64 x 64 tile of C per block of 16 x 16 threads, 4 x 4 elements per thread,
// k in steps of 16 through shared memory. Each thread adds its elements' products in k order, one
// fmaf at a time, so an element's value is the same whatever tile, launch or m it belongs to.

constexpr int kFixedTile = 64;
constexpr int kFixedStep = 16;
constexpr int kFixedThreads = 256;  // 16 x 16, each 4 x 4 elements

__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(bf16* p, float v) { *p = __float2bfloat16_rn(v); }

struct FixedGemmArgs {
  int64_t m, n, k, lda, ldb, ldc;
  bool trans_a, trans_b;
  float alpha, beta;
  const int64_t* k_rows;  // null: stored rows 0..k-1
};

/// Loads one operand's tile into S[l][x] (fp32): element (x0 + x, l0 + l) of an operand whose other
/// dimension x (rows of op(A), columns of op(B)) is `extent` long and whose reduction index l is below
/// k. Stored k-major (M[k_row(l) * ld + x], k_row(l) = k_rows[l] or l) or x-major (M[x * ld + l]);
/// the threads load along the stored contiguous dimension, 4 elements each. Out of range: 0.
template <typename T>
__device__ __forceinline__ void load_fixed_tile(float (&S)[kFixedStep][kFixedTile + 1], const T* __restrict__ M,
                                                int64_t ld, bool k_major, const int64_t* k_rows, int64_t x0,
                                                int64_t extent, int64_t l0, int64_t k) {
  for (int q = static_cast<int>(threadIdx.x); q < kFixedStep * kFixedTile; q += kFixedThreads) {
    const int x = k_major ? q % kFixedTile : q / kFixedStep;
    const int l = k_major ? q / kFixedTile : q % kFixedStep;
    const int64_t gx = x0 + x, gl = l0 + l;
    float v = 0.0f;
    if (gl < k && gx < extent)
      v = k_major ? load_f32(M + (k_rows ? k_rows[gl] : gl) * ld + gx) : load_f32(M + gx * ld + gl);
    S[l][x] = v;
  }
}

template <typename T>
__global__ void fixed_order_gemm_kernel(FixedGemmArgs g, const T* __restrict__ A, const T* __restrict__ B,
                                        T* __restrict__ C) {
  __shared__ float As[kFixedStep][kFixedTile + 1];  // As[l][i] = op(A)[row0 + i, l0 + l]
  __shared__ float Bs[kFixedStep][kFixedTile + 1];  // Bs[l][j] = op(B)[l0 + l, col0 + j]
  const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
  const int64_t tiles_m = (g.m + kFixedTile - 1) / kFixedTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kFixedTile;
  for (int64_t tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
    const int64_t row0 = tm * kFixedTile;
    float acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;
    for (int64_t l0 = 0; l0 < g.k; l0 += kFixedStep) {
      load_fixed_tile(As, A, g.lda, g.trans_a, g.k_rows, row0, g.m, l0, g.k);
      load_fixed_tile(Bs, B, g.ldb, !g.trans_b, g.k_rows, col0, g.n, l0, g.k);
      __syncthreads();
      const int steps = static_cast<int>(g.k - l0 < kFixedStep ? g.k - l0 : kFixedStep);
      for (int l = 0; l < steps; ++l) {
        float a[4], b[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = As[l][ty * 4 + r];
#pragma unroll
        for (int c = 0; c < 4; ++c) b[c] = Bs[l][tx * 4 + c];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t i = row0 + ty * 4 + r;
      if (i >= g.m) continue;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t j = col0 + tx * 4 + c;
        if (j >= g.n) continue;
        T* out = C + i * g.ldc + j;
        const float v = g.alpha * acc[r][c];
        store_f32(out, g.beta == 0.0f ? v : v + g.beta * load_f32(out));
      }
    }
  }
}

/// One validated, non-empty problem through fixed_order_gemm_kernel.
void fixed_order_run(DType dtype, const GemmProblem& p, const int64_t* k_rows, cudaStream_t stream) {
  const FixedGemmArgs g{p.m, p.n, p.k, p.lda, p.ldb, p.ldc, p.trans_a, p.trans_b, p.alpha, p.beta, k_rows};
  const int64_t tiles_n = (p.n + kFixedTile - 1) / kFixedTile, tiles_m = (p.m + kFixedTile - 1) / kFixedTile;
  const dim3 grid(static_cast<unsigned>(tiles_n), static_cast<unsigned>(std::min<int64_t>(tiles_m, 65535)));
  if (dtype == DType::kFp32) {
    MOEX_LAUNCH(grid, kFixedThreads, 0, stream, fixed_order_gemm_kernel<float>)(
        g, static_cast<const float*>(p.a), static_cast<const float*>(p.b), static_cast<float*>(p.c));
  } else {
    MOEX_LAUNCH(grid, kFixedThreads, 0, stream, fixed_order_gemm_kernel<bf16>)(
        g, static_cast<const bf16*>(p.a), static_cast<const bf16*>(p.b), static_cast<bf16*>(p.c));
  }
  MOEX_CUDA_CHECK_LAUNCH("fixed_order_gemm_kernel");
}

}  // namespace

const char* to_string(DType t) { return t == DType::kFp32 ? "fp32" : "bf16"; }
const char* to_string(GroupedGemmImpl impl) {
  switch (impl) {
    case GroupedGemmImpl::kGroupedBatched:
      return "grouped";
    case GroupedGemmImpl::kLoop:
      return "loop";
    case GroupedGemmImpl::kFixedOrder:
      return "fixed";
  }
  return "?";
}

void fixed_order_gemm(DType dtype, const GemmProblem& p, const std::int64_t* k_rows, cudaStream_t stream) {
  check_problem(p, "fixed_order_gemm", -1);
  if (k_rows && !p.trans_a && p.trans_b)
    throw InvalidArgument("fixed_order_gemm: k_rows needs an operand stored k-major (trans_a, or not trans_b); "
                          "neither is");
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) {
    scale_empty_product(p, dtype, "fixed_order_gemm", -1, stream);
    return;
  }
  fixed_order_run(dtype, p, k_rows, stream);
}
std::size_t dtype_size(DType t) { return t == DType::kFp32 ? 4 : 2; }

void gemm(cublasHandle_t blas, DType dtype, const GemmProblem& p, cudaStream_t stream) {
  check_problem(p, "gemm", -1);
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) {
    scale_empty_product(p, dtype, "gemm", -1, stream);
    return;
  }
  MOEX_CUBLAS_CHECK(cublasSetStream(blas, stream));
  gemm_ex(blas, dtype, p);
}

void GroupedGemm::run(cublasHandle_t blas, DType dtype, std::span<const GemmProblem> problems, cudaStream_t stream) {
  order_.clear();
  // Every problem is validated before anything is queued.
  for (std::size_t i = 0; i < problems.size(); ++i)
    check_problem(problems[i], "GroupedGemm::run", static_cast<std::int64_t>(i));
  for (std::size_t i = 0; i < problems.size(); ++i) {
    const GemmProblem& p = problems[i];
    const auto index = static_cast<std::int64_t>(i);
    if (p.m == 0 || p.n == 0) continue;
    if (p.k == 0) {
      scale_empty_product(p, dtype, "GroupedGemm::run", index, stream);
      continue;
    }
    order_.push_back(i);
  }
  if (order_.empty()) return;
  if (impl_ == GroupedGemmImpl::kFixedOrder) {
    for (std::size_t i : order_) fixed_order_run(dtype, problems[i], nullptr, stream);
    return;
  }
  MOEX_CUBLAS_CHECK(cublasSetStream(blas, stream));
  if (impl_ == GroupedGemmImpl::kLoop) {
    for (std::size_t i : order_) gemm_ex(blas, dtype, problems[i]);
    return;
  }
  // Problems the grouped call cannot take (misaligned bf16 pointers) run one by one.
  std::size_t kept = 0;
  for (std::size_t i : order_) {
    if (grouped_ok(dtype, problems[i]))
      order_[kept++] = i;
    else
      gemm_ex(blas, dtype, problems[i]);
  }
  order_.resize(kept);
  if (order_.empty()) return;

  // Problems of one shape form one group; cuBLAS wants each group's pointers contiguous.
  std::stable_sort(order_.begin(), order_.end(), [&](std::size_t x, std::size_t y) {
    return group_key(problems[x]) < group_key(problems[y]);
  });
  op_a_.clear();
  op_b_.clear();
  m_.clear();
  n_.clear();
  k_.clear();
  lda_.clear();
  ldb_.clear();
  ldc_.clear();
  group_size_.clear();
  alpha_.clear();
  beta_.clear();
  const std::size_t count = order_.size();
  table_.resize(3 * count);
  for (std::size_t j = 0; j < count; ++j) {
    const GemmProblem& p = problems[order_[j]];
    // Column-major view (see gemm_ex): cuBLAS's A is our B, its B our A, m and n swapped.
    table_[j] = p.b;
    table_[count + j] = p.a;
    table_[2 * count + j] = p.c;
    if (j > 0 && group_key(p) == group_key(problems[order_[j - 1]])) {
      ++group_size_.back();
      continue;
    }
    op_a_.push_back(op(p.trans_b));
    op_b_.push_back(op(p.trans_a));
    m_.push_back(static_cast<int>(p.n));
    n_.push_back(static_cast<int>(p.m));
    k_.push_back(static_cast<int>(p.k));
    lda_.push_back(static_cast<int>(p.ldb));
    ldb_.push_back(static_cast<int>(p.lda));
    ldc_.push_back(static_cast<int>(p.ldc));
    alpha_.push_back(p.alpha);
    beta_.push_back(p.beta);
    group_size_.push_back(1);
  }
  if (d_table_.size() < table_.size()) {
    // Grows only; the old table is freed in stream order, after the work already queued.
    d_table_ = DeviceBuffer<const void*>(std::max<std::size_t>(table_.size(), 2 * d_table_.size()), stream);
  }
  copy_to_device(d_table_.data(), table_.data(), table_.size(), stream);
  const cudaDataType_t t = cuda_type(dtype);
  const void* const* d_a = d_table_.data();
  const void* const* d_b = d_table_.data() + count;
  // The C pointers were stored as const void*; cuBLAS wants them writable (same representation).
  void* const* d_c = const_cast<void**>(d_table_.data() + 2 * count);
  MOEX_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(blas, op_a_.data(), op_b_.data(), m_.data(), n_.data(), k_.data(),
                                               alpha_.data(), d_a, t, lda_.data(), d_b, t, ldb_.data(), beta_.data(),
                                               d_c, t, ldc_.data(), static_cast<int>(group_size_.size()),
                                               group_size_.data(), CUBLAS_COMPUTE_32F));
}

GroupedFfn::GroupedFfn(const GroupedFfnShape& shape, DType dtype, GroupedGemmImpl impl)
    : shape_(shape), dtype_(dtype), gemm_(impl) {
  if (shape.experts < 1 || shape.hidden < 1 || shape.ffn < 1)
    throw InvalidArgument("GroupedFfn: experts = " + std::to_string(shape.experts) + ", hidden = " +
                          std::to_string(shape.hidden) + ", ffn = " + std::to_string(shape.ffn) +
                          ": each must be >= 1");
  if (shape.expert_stride != 0 && shape.expert_stride < 2 * shape.ffn * shape.hidden)
    throw InvalidArgument("GroupedFfn: expert_stride = " + std::to_string(shape.expert_stride) +
                          ": expected 0 (dense) or >= 2 * ffn * hidden = " + std::to_string(2 * shape.ffn * shape.hidden));
}

double GroupedFfn::forward_flops(std::int64_t rows, std::int64_t hidden, std::int64_t ffn) {
  return 6.0 * static_cast<double>(rows) * static_cast<double>(hidden) * static_cast<double>(ffn);
}
double GroupedFfn::backward_flops(std::int64_t rows, std::int64_t hidden, std::int64_t ffn) {
  return 12.0 * static_cast<double>(rows) * static_cast<double>(hidden) * static_cast<double>(ffn);
}

std::int64_t GroupedFfn::plan_rows(std::span<const std::int64_t> rows_per_expert, const char* what) {
  if (static_cast<std::int64_t>(rows_per_expert.size()) != shape_.experts)
    throw InvalidArgument(std::string(what) + ": rows_per_expert has " + std::to_string(rows_per_expert.size()) +
                          " entries; expected one per expert (" + std::to_string(shape_.experts) + ")");
  offsets_.assign(rows_per_expert.size() + 1, 0);
  for (std::size_t e = 0; e < rows_per_expert.size(); ++e) {
    const std::int64_t r = rows_per_expert[e];
    if (r < 0 || r > INT_MAX)
      throw InvalidArgument(std::string(what) + ": rows_per_expert[" + std::to_string(e) + "] = " + std::to_string(r) +
                            ": expected a count in [0, INT_MAX]");
    offsets_[e + 1] = offsets_[e] + r;
  }
  problems_.clear();
  return offsets_.back();
}

void GroupedFfn::swiglu_fwd(std::int64_t rows, const void* h13, void* sig, void* a, cudaStream_t stream) const {
  if (dtype_ == DType::kFp32)
    swiglu_forward(rows, shape_.ffn, static_cast<const float*>(h13), static_cast<float*>(sig), static_cast<float*>(a),
                   stream);
  else
    swiglu_forward(rows, shape_.ffn, static_cast<const bf16*>(h13), static_cast<bf16*>(sig), static_cast<bf16*>(a),
                   stream);
}

void GroupedFfn::swiglu_bwd(std::int64_t rows, const void* h13, const void* sig, void* dh13, cudaStream_t stream) const {
  const std::int64_t F = shape_.ffn;
  if (dtype_ == DType::kFp32) {
    float* d = static_cast<float*>(dh13);
    swiglu_backward(rows, F, static_cast<const float*>(h13), static_cast<const float*>(sig), d + F, 2 * F, d, stream);
  } else {
    bf16* d = static_cast<bf16*>(dh13);
    swiglu_backward(rows, F, static_cast<const bf16*>(h13), static_cast<const bf16*>(sig), d + F, 2 * F, d, stream);
  }
}


void GroupedFfn::forward(cublasHandle_t blas, std::span<const std::int64_t> rows_per_expert, const void* x,
                         const void* w13, const void* w2, void* h13, void* sig, void* a, void* y, cudaStream_t stream) {
  const std::int64_t N = plan_rows(rows_per_expert, "GroupedFfn::forward");
  if (N == 0) return;
  const std::int64_t H = shape_.hidden, F = shape_.ffn, S13 = shape_.w13_stride(), S2 = shape_.w2_stride();
  const std::size_t es = dtype_size(dtype_);
  // h13_e [r, 2F] = x_e [r, H] . w13_e [2F, H]^T
  for (std::int64_t e = 0; e < shape_.experts; ++e) {
    const std::int64_t r = rows_per_expert[static_cast<std::size_t>(e)], o = offsets_[static_cast<std::size_t>(e)];
    if (r == 0) continue;
    problems_.push_back(gemm_problem(false, true, r, 2 * F, H, elem_at(x, o * H, es), H, elem_at(w13, e * S13, es), H,
                                     elem_at(h13, o * 2 * F, es), 2 * F));
  }
  gemm_.run(blas, dtype_, problems_, stream);
  swiglu_fwd(N, h13, sig, a, stream);
  // y_e [r, H] = a_e [r, F] . w2_e [H, F]^T
  problems_.clear();
  for (std::int64_t e = 0; e < shape_.experts; ++e) {
    const std::int64_t r = rows_per_expert[static_cast<std::size_t>(e)], o = offsets_[static_cast<std::size_t>(e)];
    if (r == 0) continue;
    problems_.push_back(gemm_problem(false, true, r, H, F, elem_at(a, o * F, es), F, elem_at(w2, e * S2, es), F,
                                     elem_at(y, o * H, es), H));
  }
  gemm_.run(blas, dtype_, problems_, stream);
}

void GroupedFfn::backward_data(cublasHandle_t blas, std::span<const std::int64_t> rows_per_expert, const void* w13,
                               const void* w2, const void* h13, const void* sig, const void* dy, void* dx, void* dh13,
                               cudaStream_t stream) {
  const std::int64_t N = plan_rows(rows_per_expert, "GroupedFfn::backward_data");
  if (N == 0) return;
  const std::int64_t H = shape_.hidden, F = shape_.ffn, S13 = shape_.w13_stride(), S2 = shape_.w2_stride();
  const std::size_t es = dtype_size(dtype_);
  // dA_e [r, F] (the up half of dh13_e) = dy_e [r, H] . w2_e [H, F]
  for (std::int64_t e = 0; e < shape_.experts; ++e) {
    const std::int64_t r = rows_per_expert[static_cast<std::size_t>(e)], o = offsets_[static_cast<std::size_t>(e)];
    if (r > 0)
      problems_.push_back(gemm_problem(false, false, r, F, H, elem_at(dy, o * H, es), H, elem_at(w2, e * S2, es), F,
                                       elem_at(dh13, o * 2 * F + F, es), 2 * F));
  }
  gemm_.run(blas, dtype_, problems_, stream);
  swiglu_bwd(N, h13, sig, dh13, stream);
  // dx_e [r, H] = dh13_e [r, 2F] . w13_e [2F, H]
  problems_.clear();
  for (std::int64_t e = 0; e < shape_.experts; ++e) {
    const std::int64_t r = rows_per_expert[static_cast<std::size_t>(e)], o = offsets_[static_cast<std::size_t>(e)];
    if (r > 0)
      problems_.push_back(gemm_problem(false, false, r, H, 2 * F, elem_at(dh13, o * 2 * F, es), 2 * F,
                                       elem_at(w13, e * S13, es), H, elem_at(dx, o * H, es), H));
  }
  gemm_.run(blas, dtype_, problems_, stream);
}

void GroupedFfn::backward_weights(std::span<const std::int64_t> rows_per_expert, const std::int64_t* k_rows,
                                  const void* x, const void* a, const void* dy, const void* dh13, void* dw13, void* dw2,
                                  bool accumulate, cudaStream_t stream) {
  const std::int64_t N = plan_rows(rows_per_expert, "GroupedFfn::backward_weights");
  if (N > 0 && !k_rows)
    throw InvalidArgument("GroupedFfn::backward_weights: k_rows is null (expected a device array of " +
                          std::to_string(N) + " row indexes)");
  const std::int64_t H = shape_.hidden, F = shape_.ffn, S13 = shape_.w13_stride(), S2 = shape_.w2_stride();
  const std::size_t es = dtype_size(dtype_);
  const float beta = accumulate ? 1.0f : 0.0f;
  for (std::int64_t e = 0; e < shape_.experts; ++e) {
    const std::int64_t r = rows_per_expert[static_cast<std::size_t>(e)], o = offsets_[static_cast<std::size_t>(e)];
    const std::int64_t* rows = r > 0 ? k_rows + o : nullptr;
    // dw2_e [H, F] (+)= dy^T . a and dw13_e [2F, H] (+)= dh13^T . x over the expert's rows, in k_rows order.
    fixed_order_gemm(dtype_, gemm_problem(true, false, H, F, r, dy, H, a, F, elem_at(dw2, e * S2, es), F, beta), rows,
                     stream);
    fixed_order_gemm(dtype_, gemm_problem(true, false, 2 * F, H, r, dh13, 2 * F, x, H, elem_at(dw13, e * S13, es), H,
                                          beta),
                     rows, stream);
  }
}

void GroupedFfn::backward(cublasHandle_t blas, std::span<const std::int64_t> rows_per_expert, const void* x,
                          const void* w13, const void* w2, const void* h13, const void* sig, const void* a,
                          const void* dy, void* dw13, void* dw2, void* dx, void* dh13, bool accumulate,
                          cudaStream_t stream) {
  const std::int64_t N = plan_rows(rows_per_expert, "GroupedFfn::backward");
  const std::int64_t H = shape_.hidden, F = shape_.ffn, S13 = shape_.w13_stride(), S2 = shape_.w2_stride();
  const std::size_t es = dtype_size(dtype_);
  const float beta = accumulate ? 1.0f : 0.0f;
  // dA_e [r, F] (the up half of dh13_e) = dy_e [r, H] . w2_e [H, F];  dw2_e [H, F] (+)= dy_e^T . a_e
  for (std::int64_t e = 0; e < shape_.experts; ++e) {
    const std::int64_t r = rows_per_expert[static_cast<std::size_t>(e)], o = offsets_[static_cast<std::size_t>(e)];
    if (r > 0)
      problems_.push_back(gemm_problem(false, false, r, F, H, elem_at(dy, o * H, es), H, elem_at(w2, e * S2, es), F,
                                       elem_at(dh13, o * 2 * F + F, es), 2 * F));
    problems_.push_back(gemm_problem(true, false, H, F, r, elem_at(dy, o * H, es), H, elem_at(a, o * F, es), F,
                                     elem_at(dw2, e * S2, es), F, beta));
  }
  gemm_.run(blas, dtype_, problems_, stream);
  swiglu_bwd(N, h13, sig, dh13, stream);
  // dx_e [r, H] = dh13_e [r, 2F] . w13_e [2F, H];  dw13_e [2F, H] (+)= dh13_e^T . x_e
  problems_.clear();
  for (std::int64_t e = 0; e < shape_.experts; ++e) {
    const std::int64_t r = rows_per_expert[static_cast<std::size_t>(e)], o = offsets_[static_cast<std::size_t>(e)];
    if (r > 0)
      problems_.push_back(gemm_problem(false, false, r, H, 2 * F, elem_at(dh13, o * 2 * F, es), 2 * F,
                                       elem_at(w13, e * S13, es), H, elem_at(dx, o * H, es), H));
    problems_.push_back(gemm_problem(true, false, 2 * F, H, r, elem_at(dh13, o * 2 * F, es), 2 * F,
                                     elem_at(x, o * H, es), H, elem_at(dw13, e * S13, es), H, beta));
  }
  gemm_.run(blas, dtype_, problems_, stream);
}

}  // namespace moex::cuda
