// Cost-volume CUDA kernels: plain CUDA on raw pointers. No torch headers, so CI can compile this translation unit
// with `nvcc -c` (and read its registers and SASS) on a machine without a GPU or a CUDA build of torch.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace hcml {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Every buffer is NHWC and contiguous: f1, f2, g1, g2 are (B, H, W, Cs), the volume and its grad (B, H, W, D*D);
// Cs is C rounded up to a 16-byte vector (padding channels zero), pointers 16-byte aligned. ops/_cuda.py makes it so.
struct CostVolumeShape {
  int B, C, Cs, H, W;
  int max_displacement, stride;  // D = 2 * max_displacement / stride + 1
};

// (max displacement, stride) pairs with compile-time kernels: the paper's 6 and 2 (every model). ops/_cuda.py reads
// this line to plan calls on the CPU side, so it is the one place the set is written.
constexpr int kFastPairs[][2] = {{6, 2}};

// Which kernel served a call, for the op's dispatch counters.
enum class Kernel : int { kFast = 0, kGeneric = 1, kTensorCore = 2 };
constexpr int kKernels = 3;

// bf16/fp16 calls with the compile-time (D, S) take the tensor-core kernels on sm_80 and later unless switched off
// here (the benchmark times both families); fp32 always takes the CUDA-core ones.
void set_tensor_cores(bool enabled);

// out[b, y, x, i*D+j] = 1/C sum_c f1[b,y,x,c] * f2[b,y+dy_i,x+dx_j,c]  (zero outside), fp32 accumulation.
cudaError_t cost_volume_forward(DType dt, CostVolumeShape shape, const void* f1, const void* f2, void* out,
                                cudaStream_t stream, Kernel* used);

// Gradients of the forward for both inputs (one fused kernel); grad has the volume's shape.
cudaError_t cost_volume_backward(DType dt, CostVolumeShape shape, const void* grad, const void* f1, const void* f2,
                                 void* g1, void* g2, cudaStream_t stream, Kernel* used);

}  // namespace hcml
