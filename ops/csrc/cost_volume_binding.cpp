// Torch binding for the cost-volume kernels. Uses only the CPU-side torch headers: the CUDA stream comes from
// Python as an integer handle, so this file also syntax-checks against a CPU-only torch.
//
// It takes the buffers ops/_cuda.py prepares, (B, H, W, Cs) contiguous NHWC, 16-byte aligned, Cs a multiple of a
// 16-byte vector, and refuses anything else: there is no slow path to fall into silently. It counts which kernel
// served each call (dispatch_counts), which `hcml bench op` prints and the GPU tests assert on.
#include <torch/extension.h>

#include <array>
#include <atomic>

#include "cost_volume_kernels.cuh"

namespace {

// forward per Kernel (fast, generic, tensor core), then backward per Kernel
std::array<std::atomic<int64_t>, 2 * hcml::kKernels> counts{};
constexpr const char* kKernelNames[hcml::kKernels] = {"fast", "generic", "tensor_core"};

hcml::DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return hcml::DType::kFloat32;
    case torch::kFloat16: return hcml::DType::kFloat16;
    case torch::kBFloat16: return hcml::DType::kBFloat16;
    default: TORCH_CHECK(false, "cost_volume: dtype ", t.scalar_type(), " not supported (float32/float16/bfloat16)");
  }
}

void check_buffer(const torch::Tensor& t, const torch::Tensor& like, const char* what, bool vectors) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "cost_volume: ", what, " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "cost_volume: ", what, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(), "cost_volume: ", what, " must be a contiguous (B, H, W, C) buffer");
  if (vectors) {
    TORCH_CHECK(t.size(3) * t.element_size() % 16 == 0, "cost_volume: ", what, " channel stride ", t.size(3),
                " is not a whole number of 16-byte vectors");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "cost_volume: ", what,
                " is not 16-byte aligned");
  }
}

hcml::CostVolumeShape shape_of(const torch::Tensor& f1, int64_t channels, int64_t md, int64_t stride) {
  TORCH_CHECK(stride > 0 && md >= 0 && md % stride == 0, "cost_volume: max_displacement (", md,
              ") must be a non-negative multiple of stride (", stride, ")");
  TORCH_CHECK(channels > 0 && channels <= f1.size(3), "cost_volume: ", channels, " channels in a buffer of ",
              f1.size(3));
  return {(int)f1.size(0), (int)channels, (int)f1.size(3), (int)f1.size(1), (int)f1.size(2), (int)md, (int)stride};
}

torch::Tensor forward(torch::Tensor f1, torch::Tensor f2, int64_t channels, int64_t md, int64_t stride,
                      int64_t stream) {
  check_buffer(f1, f1, "f1", true);
  check_buffer(f2, f1, "f2", true);
  TORCH_CHECK(f1.sizes() == f2.sizes(), "cost_volume: f1 ", f1.sizes(), " and f2 ", f2.sizes(), " differ");
  const auto sh = shape_of(f1, channels, md, stride);
  const int64_t D = 2 * (md / stride) + 1;
  auto out = torch::empty({f1.size(0), f1.size(1), f1.size(2), D * D}, f1.options());
  hcml::Kernel used = hcml::Kernel::kGeneric;
  const auto err = hcml::cost_volume_forward(dtype_of(f1), sh, f1.data_ptr(), f2.data_ptr(), out.data_ptr(),
                                             reinterpret_cast<cudaStream_t>(stream), &used);
  TORCH_CHECK(err == cudaSuccess, "cost_volume forward kernel failed: ", cudaGetErrorString(err));
  ++counts[static_cast<int>(used)];
  return out;
}

std::vector<torch::Tensor> backward(torch::Tensor grad, torch::Tensor f1, torch::Tensor f2, int64_t channels,
                                    int64_t md, int64_t stride, int64_t stream) {
  check_buffer(f1, f1, "f1", true);
  check_buffer(f2, f1, "f2", true);
  check_buffer(grad, f1, "grad", false);
  const auto sh = shape_of(f1, channels, md, stride);
  const int64_t D = 2 * (md / stride) + 1;
  TORCH_CHECK(grad.size(0) == f1.size(0) && grad.size(1) == f1.size(1) && grad.size(2) == f1.size(2) &&
                  grad.size(3) == D * D,
              "cost_volume backward: grad ", grad.sizes(), " does not match the volume of ", f1.sizes());
  auto g1 = torch::empty_like(f1), g2 = torch::empty_like(f2);
  hcml::Kernel used = hcml::Kernel::kGeneric;
  const auto err = hcml::cost_volume_backward(dtype_of(f1), sh, grad.data_ptr(), f1.data_ptr(), f2.data_ptr(),
                                              g1.data_ptr(), g2.data_ptr(), reinterpret_cast<cudaStream_t>(stream),
                                              &used);
  TORCH_CHECK(err == cudaSuccess, "cost_volume backward kernel failed: ", cudaGetErrorString(err));
  ++counts[hcml::kKernels + static_cast<int>(used)];
  return {g1, g2};
}

std::map<std::string, int64_t> dispatch_counts() {
  std::map<std::string, int64_t> out;
  for (int k = 0; k < hcml::kKernels; ++k) {
    out[std::string("forward_") + kKernelNames[k]] = counts[k];
    out[std::string("backward_") + kKernelNames[k]] = counts[hcml::kKernels + k];
  }
  return out;
}

void reset_dispatch_counts() {
  for (auto& c : counts) c = 0;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "cost volume forward (CUDA) on prepared NHWC buffers");
  m.def("backward", &backward, "cost volume backward (CUDA, fused) on prepared NHWC buffers");
  m.def("dispatch_counts", &dispatch_counts, "which kernel served each call since the last reset");
  m.def("reset_dispatch_counts", &reset_dispatch_counts);
  m.def("set_tensor_cores", &hcml::set_tensor_cores, "bf16/fp16 (6, 2) calls on the tensor-core kernels (default) "
        "or the CUDA-core ones (for comparison)");
}
