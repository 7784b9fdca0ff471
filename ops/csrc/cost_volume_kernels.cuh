// Cost-volume CUDA kernels: plain CUDA (raw pointers, sizes, strides). No torch headers, so CI can compile
// this translation unit with `nvcc -c` on a machine without a GPU or a CUDA build of torch.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace hcml {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Element strides of a (B, C, H, W) tensor: contiguous NCHW and channels_last NHWC both fit.
struct Strides4 {
  int64_t n, c, h, w;
};

struct CostVolumeShape {
  int B, C, H, W;
  int max_displacement, stride;  // D = 2 * max_displacement / stride + 1
};

// out[b, i*D+j, y, x] = 1/C sum_c f1[b,c,y,x] * f2[b,c,y+dy_i,x+dx_j]  (zero outside), fp32 accumulation.
cudaError_t cost_volume_forward(DType dt, CostVolumeShape shape, const void* f1, Strides4 s1, const void* f2,
                                Strides4 s2, void* out, Strides4 so, cudaStream_t stream);

// Gradients of the forward for both inputs; grad has the output's shape (B, D*D, H, W).
cudaError_t cost_volume_backward(DType dt, CostVolumeShape shape, const void* grad, Strides4 sg, const void* f1,
                                 Strides4 s1, const void* f2, Strides4 s2, void* g1, Strides4 sg1, void* g2,
                                 Strides4 sg2, cudaStream_t stream);

}  // namespace hcml
