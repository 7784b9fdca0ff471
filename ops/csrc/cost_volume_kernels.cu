// Dispatch of the cost-volume kernels (cost_volume_nhwc.cuh): for the (max displacement, stride) the models use,
// the tensor-core kernels (bf16/fp16 on sm_80+) or the compile-time CUDA-core ones; the generic kernels for any
// other. Instantiated here and nowhere else, so the JIT build and the static report (`hcml bench op --static`)
// compile exactly what can run.
#include "cost_volume_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cost_volume_nhwc.cuh"

namespace hcml {
namespace {

using nhwc::Shape;

// One launch of a tiled kernel with `smem` bytes of dynamic shared memory (opted in above 48 KB).
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, int threads, int smem, cudaStream_t stream, Args... args) {
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return cudaErrorInvalidConfiguration;
  kernel<<<grid, threads, smem, stream>>>(args...);
  return cudaGetLastError();
}

// The compile-time kernels: (D, S) = (7, 2) is max displacement 6, stride 2 (every model of the paper).
template <typename T, int D, int S>
cudaError_t fast_forward(const Shape& sh, const T* f1, const T* f2, T* out, cudaStream_t stream) {
  using K = nhwc::Fast<T, D, S>;
  return launch(nhwc::forward_fast<T, D, S>, nhwc::tile_grid<K>(sh), K::THREADS, K::SMEM_FWD, stream, sh, f1, f2, out);
}

template <typename T, int D, int S>
cudaError_t fast_backward(const Shape& sh, const T* g, const T* f1, const T* f2, T* g1, T* g2, cudaStream_t stream) {
  using K = nhwc::Fast<T, D, S>;
  return launch(nhwc::backward_fast<T, D, S>, nhwc::tile_grid<K>(sh), K::THREADS_BWD, K::SMEM_BWD, stream, sh, g, f1,
                f2, g1, g2);
}

bool is_fast(const CostVolumeShape& s) {
  for (const auto& p : kFastPairs)
    if (s.max_displacement == p[0] && s.stride == p[1]) return true;
  return false;
}

bool tensor_cores_enabled = true;

// mma.sync with bf16/fp16 inputs needs sm_80: asked once per device.
bool tensor_cores_here() {
  static int major[64] = {};
  int dev = 0;
  if (!tensor_cores_enabled || cudaGetDevice(&dev) != cudaSuccess || dev >= 64) return false;
  if (major[dev] == 0 && cudaDeviceGetAttribute(&major[dev], cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return false;
  return major[dev] >= 8;
}

template <typename T, int D, int S>
cudaError_t tc_forward(const Shape& sh, const T* f1, const T* f2, T* out, cudaStream_t stream) {
  using K = nhwc::Tc<T, D, S>;
  return launch(nhwc::forward_tc<T, D, S>, nhwc::tile_grid<K>(sh), K::THREADS, K::SMEM_FWD, stream, sh, f1, f2, out);
}

template <typename T, int D, int S>
cudaError_t tc_backward(const Shape& sh, const T* g, const T* f1, const T* f2, T* g1, T* g2, cudaStream_t stream) {
  using K = nhwc::Tc<T, D, S>;
  return launch(nhwc::backward_tc<T, D, S>, nhwc::tile_grid<K>(sh), K::THREADS, K::SMEM_BWD, stream, sh, g, f1, f2,
                g1, g2);
}

// The one rule for which family serves a call of element type T (forward and backward alike).
template <typename T>
Kernel choose(const CostVolumeShape& s) {
  if (!is_fast(s)) return Kernel::kGeneric;
  return sizeof(T) == 2 && tensor_cores_here() ? Kernel::kTensorCore : Kernel::kFast;
}

template <typename T>
cudaError_t forward_t(const CostVolumeShape& s, const void* f1, const void* f2, void* out, cudaStream_t stream,
                      Kernel* used) {
  const Shape sh{s.B, s.C, s.Cs, s.H, s.W};
  const T *a = static_cast<const T*>(f1), *b = static_cast<const T*>(f2);
  T* o = static_cast<T*>(out);
  *used = choose<T>(s);
  if constexpr (sizeof(T) == 2)  // (the tensor-core kernels exist for 16-bit types only)
    if (*used == Kernel::kTensorCore) return tc_forward<T, 7, 2>(sh, a, b, o, stream);
  if (*used == Kernel::kFast) return fast_forward<T, 7, 2>(sh, a, b, o, stream);
  const int D = 2 * (s.max_displacement / s.stride) + 1;
  const int64_t n = static_cast<int64_t>(s.B) * s.H * s.W * D * D;
  nhwc::forward_generic<T><<<nhwc::generic_blocks(n), nhwc::GENERIC_THREADS, 0, stream>>>(sh, D, s.stride, a, b, o);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const CostVolumeShape& s, const void* g, const void* f1, const void* f2, void* g1, void* g2,
                       cudaStream_t stream, Kernel* used) {
  const Shape sh{s.B, s.C, s.Cs, s.H, s.W};
  const T *gp = static_cast<const T*>(g), *a = static_cast<const T*>(f1), *b = static_cast<const T*>(f2);
  T *o1 = static_cast<T*>(g1), *o2 = static_cast<T*>(g2);
  *used = choose<T>(s);
  if constexpr (sizeof(T) == 2)
    if (*used == Kernel::kTensorCore) return tc_backward<T, 7, 2>(sh, gp, a, b, o1, o2, stream);
  if (*used == Kernel::kFast) return fast_backward<T, 7, 2>(sh, gp, a, b, o1, o2, stream);
  const int D = 2 * (s.max_displacement / s.stride) + 1;
  const int64_t n = static_cast<int64_t>(s.B) * s.H * s.W * (s.Cs / nhwc::Vec<T>::N);
  nhwc::backward_generic<T><<<nhwc::generic_blocks(n), nhwc::GENERIC_THREADS, 0, stream>>>(sh, D, s.stride, gp, a, b,
                                                                                          o1, o2);
  return cudaGetLastError();
}

}  // namespace

void set_tensor_cores(bool enabled) { tensor_cores_enabled = enabled; }

cudaError_t cost_volume_forward(DType dt, CostVolumeShape sh, const void* f1, const void* f2, void* out,
                                cudaStream_t stream, Kernel* used) {
  if (sh.B == 0 || sh.H == 0 || sh.W == 0) return cudaSuccess;
  switch (dt) {
    case DType::kFloat32: return forward_t<float>(sh, f1, f2, out, stream, used);
    case DType::kFloat16: return forward_t<__half>(sh, f1, f2, out, stream, used);
    case DType::kBFloat16: return forward_t<__nv_bfloat16>(sh, f1, f2, out, stream, used);
  }
  return cudaErrorInvalidValue;
}

cudaError_t cost_volume_backward(DType dt, CostVolumeShape sh, const void* g, const void* f1, const void* f2, void* g1,
                                 void* g2, cudaStream_t stream, Kernel* used) {
  if (sh.B == 0 || sh.H == 0 || sh.W == 0) return cudaSuccess;
  switch (dt) {
    case DType::kFloat32: return backward_t<float>(sh, g, f1, f2, g1, g2, stream, used);
    case DType::kFloat16: return backward_t<__half>(sh, g, f1, f2, g1, g2, stream, used);
    case DType::kBFloat16: return backward_t<__nv_bfloat16>(sh, g, f1, f2, g1, g2, stream, used);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hcml
