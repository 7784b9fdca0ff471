// Torch binding for the cost-volume kernels. Uses only the CPU-side torch headers: the CUDA stream comes from
// Python as an integer handle, so this file also syntax-checks against a CPU-only torch.
#include <torch/extension.h>

#include "cost_volume_kernels.cuh"

namespace {

hcml::Strides4 strides_of(const torch::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

hcml::DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return hcml::DType::kFloat32;
    case torch::kFloat16: return hcml::DType::kFloat16;
    case torch::kBFloat16: return hcml::DType::kBFloat16;
    default: TORCH_CHECK(false, "cost_volume: dtype ", t.scalar_type(), " not supported (float32/float16/bfloat16)");
  }
}

void check_inputs(const torch::Tensor& f1, const torch::Tensor& f2) {
  TORCH_CHECK(f1.is_cuda() && f2.is_cuda(), "cost_volume CUDA path needs CUDA tensors");
  TORCH_CHECK(f1.dim() == 4 && f1.sizes() == f2.sizes(), "cost_volume: f1, f2 must be (B, C, H, W) of one shape");
  TORCH_CHECK(f1.scalar_type() == f2.scalar_type(), "cost_volume: f1 and f2 dtypes differ");
  TORCH_CHECK(f1.device() == f2.device(), "cost_volume: f1 and f2 on different devices");
}

// Keep channels_last inputs channels_last: the kernels read through strides either way.
torch::Tensor empty_like_layout(const torch::Tensor& ref, at::IntArrayRef sizes) {
  const auto fmt = ref.is_contiguous(at::MemoryFormat::ChannelsLast) && !ref.is_contiguous()
                       ? at::MemoryFormat::ChannelsLast
                       : at::MemoryFormat::Contiguous;
  return torch::empty(sizes, ref.options().memory_format(fmt));
}

hcml::CostVolumeShape shape_of(const torch::Tensor& f1, int64_t md, int64_t stride) {
  TORCH_CHECK(stride > 0 && md >= 0 && md % stride == 0, "cost_volume: max_displacement (", md,
              ") must be a non-negative multiple of stride (", stride, ")");
  return {(int)f1.size(0), (int)f1.size(1), (int)f1.size(2), (int)f1.size(3), (int)md, (int)stride};
}

torch::Tensor forward(torch::Tensor f1, torch::Tensor f2, int64_t md, int64_t stride, int64_t stream) {
  check_inputs(f1, f2);
  const auto sh = shape_of(f1, md, stride);
  const int64_t D = 2 * (md / stride) + 1;
  auto out = empty_like_layout(f1, {f1.size(0), D * D, f1.size(2), f1.size(3)});
  const auto err = hcml::cost_volume_forward(dtype_of(f1), sh, f1.data_ptr(), strides_of(f1), f2.data_ptr(),
                                             strides_of(f2), out.data_ptr(), strides_of(out),
                                             reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == cudaSuccess, "cost_volume forward kernel failed: ", cudaGetErrorString(err));
  return out;
}

std::vector<torch::Tensor> backward(torch::Tensor grad, torch::Tensor f1, torch::Tensor f2, int64_t md,
                                    int64_t stride, int64_t stream) {
  check_inputs(f1, f2);
  const auto sh = shape_of(f1, md, stride);
  TORCH_CHECK(grad.scalar_type() == f1.scalar_type(), "cost_volume backward: grad dtype differs from inputs");
  auto g1 = empty_like_layout(f1, f1.sizes());
  auto g2 = empty_like_layout(f2, f2.sizes());
  // channels_last inputs take the NHWC kernels, which want the grad channels_last too (one copy if it is not)
  if (g1.is_contiguous(at::MemoryFormat::ChannelsLast) && !g1.is_contiguous() &&
      !grad.is_contiguous(at::MemoryFormat::ChannelsLast))
    grad = grad.contiguous(at::MemoryFormat::ChannelsLast);
  const auto err = hcml::cost_volume_backward(
      dtype_of(f1), sh, grad.data_ptr(), strides_of(grad), f1.data_ptr(), strides_of(f1), f2.data_ptr(),
      strides_of(f2), g1.data_ptr(), strides_of(g1), g2.data_ptr(), strides_of(g2),
      reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == cudaSuccess, "cost_volume backward kernel failed: ", cudaGetErrorString(err));
  return {g1, g2};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "cost volume forward (CUDA)");
  m.def("backward", &backward, "cost volume backward (CUDA)");
}
