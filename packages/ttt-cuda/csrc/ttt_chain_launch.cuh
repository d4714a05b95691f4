// The launch every fused op shares: one thread block of kChainThreads per (batch, head) chain, its
// scratch in dynamic shared memory when it fits, else in a global slice per chain given by the
// caller. `Chain` supplies the op: `using Params = ...;` (with B, H, L, workspace, max_smem,
// stream), `static constexpr bool kMayUseShared` (false: the scratch never fits, only the global
// kernel is built) and `static __device__ void run(const Params&, float* ws, int bi, int hi)`.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "ttt_params.h"

namespace ttt {

constexpr int kChainThreads = 256;

// kShared: the scratch is the block's dynamic shared memory, so after inlining every scratch access
// is a shared-memory load/store (ld.shared / LDS); else each chain's slice of a global scratch
// (generic loads, L2-resident). Two instantiations instead of a pointer chosen at run time.
template <typename Chain, bool kShared>
__global__ void __launch_bounds__(kChainThreads, 1)
    chain_kernel(const typename Chain::Params p, float* ws_global, int64_t ws_elems) {
  float* ws;
  if constexpr (kShared) {
    extern __shared__ __align__(16) float ttt_smem[];
    ws = ttt_smem;
  } else {
    ws = ws_global + static_cast<int64_t>(blockIdx.x) * ws_elems;
  }
  const int bi = static_cast<int>(blockIdx.x) / p.H, hi = static_cast<int>(blockIdx.x) % p.H;
  Chain::run(p, ws, bi, hi);
}

// The shape checks every CUDA op makes before launching (the CPU path's, in one place): "" or why.
inline const char* chain_shape_error(const LinearParams& p) {
  if (p.B < 0 || p.H < 0 || p.L < 1 || p.mini_batch_size < 1)
    return "bad shape parameters: need B >= 0, H >= 0, L >= 1 and mini_batch_size >= 1";
  if (p.offset < 0 || p.offset >= p.mini_batch_size || (p.offset > 0 && !p.causal))
    return "offset must be in [0, mini_batch_size) and needs causal";
  return "";
}

// Shared memory (bytes) the shared-scratch kernel of `Chain` needs for `elems` scratch floats per
// chain: dynamic (the scratch) + the kernel's static shared memory; -1 when the kernel cannot be
// queried (the runtime's error is cleared). THE fit check: the launcher refuses a shared-memory
// launch above p.max_smem, and the Python side picks a global workspace through
// `<op>_scratch_in_shared`, which calls this.
template <typename Chain>
int64_t chain_shared_bytes(int64_t elems) {
  if constexpr (!Chain::kMayUseShared) {
    return -1;
  } else {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, chain_kernel<Chain, true>) != cudaSuccess) {
      (void)cudaGetLastError();  // clear it: the next launch must not report it
      return -1;
    }
    return elems * static_cast<int64_t>(sizeof(float)) + static_cast<int64_t>(attr.sharedSizeBytes);
  }
}

template <typename Chain>
bool chain_scratch_in_shared(const typename Chain::Params& p, int64_t elems) {
  const int64_t need = chain_shared_bytes<Chain>(elems);
  return need >= 0 && need <= p.max_smem;
}

// What a dispatcher asks of one kernel instantiation.
enum class ChainCall {
  kLaunch,       // launch on p.stream (no host synchronisation)
  kQueryShared,  // launch nothing: "" when the scratch runs from shared memory, else why not
};

// `elems`: scratch floats per chain. kLaunch runs the global kernel when p.workspace is given, else
// the shared one (if it fits). Returns "" or the reason, with the CUDA error named; a failed CUDA
// call leaves no pending error behind.
template <typename Chain>
const char* run_chain(const typename Chain::Params& p, int64_t elems, ChainCall call) {
  static thread_local std::string reason;  // the text of the last failure, returned by pointer
  constexpr const char* kNoFit =
      "the chain scratch does not fit in shared memory and no global workspace was given";
  if (call == ChainCall::kQueryShared) {
    return chain_scratch_in_shared<Chain>(p, elems) ? "" : kNoFit;
  }
  const int blocks = p.B * p.H;
  if (blocks == 0) return "";
  const auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  float* ws = static_cast<float*>(p.workspace);
  if (ws != nullptr) {
    chain_kernel<Chain, false><<<blocks, kChainThreads, 0, stream>>>(p, ws, elems);
  } else if constexpr (!Chain::kMayUseShared) {
    return kNoFit;
  } else {
    if (!chain_scratch_in_shared<Chain>(p, elems)) return kNoFit;
    const size_t smem = static_cast<size_t>(elems) * sizeof(float);
    auto kernel = chain_kernel<Chain, true>;
    if (smem > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) {
        (void)cudaGetLastError();  // clear it: the next good launch must not report it
        reason = std::string("cudaFuncSetAttribute(MaxDynamicSharedMemorySize, ") +
                 std::to_string(smem) + " B) failed: " + cudaGetErrorString(err);
        return reason.c_str();
      }
    }
    kernel<<<blocks, kChainThreads, smem, stream>>>(p, nullptr, elems);
  }
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return "";
  reason = std::string("kernel launch failed: ") + cudaGetErrorString(err);
  return reason.c_str();
}

// Dispatch helpers: call fn(DTypeTag<scalar_t>{}) for the input dtype, fn(HeadDim<kD>{}) for the
// head dim; return fn's result or why the value is refused.
template <typename T>
struct DTypeTag {
  using type = T;
};
template <int kD>
using HeadDim = std::integral_constant<int, kD>;

template <typename Fn>
const char* with_input_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(DTypeTag<float>{});
    case DType::kBFloat16: return fn(DTypeTag<__nv_bfloat16>{});
    case DType::kFloat16: return fn(DTypeTag<__half>{});
    default: return "dtype must be float32, bfloat16 or float16 for the CUDA kernels";
  }
}

template <typename Fn>
const char* with_head_dim_64_or_128(int D, Fn&& fn) {
  if (D == 64) return fn(HeadDim<64>{});
  if (D == 128) return fn(HeadDim<128>{});
  return "head dim must be 64 or 128 for the CUDA kernels";
}

// The TTT-Linear and Titans dispatch: head dim 64 or 128, then the shape checks, then the input
// dtype; calls fn(DTypeTag<scalar_t>{}, HeadDim<kD>{}).
template <typename Fn>
const char* with_linear_kernel(const LinearParams& p, Fn&& fn) {
  return with_head_dim_64_or_128(p.D, [&](auto d) {
    const char* err = chain_shape_error(p);
    if (err[0] != '\0') return err;
    return with_input_dtype(p.dtype, [&](auto t) { return fn(t, d); });
  });
}

}  // namespace ttt

// The three host entries of op `name` declared in ttt_params.h, over the op's
// `dispatch(params, backward, ChainCall)`: forward, backward, and the shared-memory fit query.
#define TTT_CUDA_ENTRIES(name, Params)                                    \
  const char* name##_fwd_cuda(const Params& p) {                          \
    return dispatch(p, false, ChainCall::kLaunch);                        \
  }                                                                       \
  const char* name##_bwd_cuda(const Params& p) {                          \
    return dispatch(p, true, ChainCall::kLaunch);                         \
  }                                                                       \
  bool name##_scratch_in_shared(const Params& p, bool backward) {         \
    return dispatch(p, backward, ChainCall::kQueryShared)[0] == '\0';     \
  }
