// Just enough of CUDA, on the CPU, to run this project's NHWC kernels unchanged under g++ (-DHCML_EMULATE,
// C++20, -pthread): each CUDA thread of a block is a host thread, __syncthreads() is a real barrier, dynamic
// shared memory is one buffer per block, and the half / bfloat16 types convert with round-to-nearest-even.
// Blocks run one after another. Slow, but it executes the same index arithmetic, halos and synchronisation as
// the GPU, which is what tests/test_cost_volume.py checks against a naive reference on machines with no GPU.
#pragma once
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

using std::min;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

namespace hcml_emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<float>* block_exchange = nullptr;  // one slot per thread, for warp shuffles
inline float* block_smem = nullptr;
inline float* shared_memory() { return block_smem; }
inline void sync() { block_barrier->arrive_and_wait(); }

// Run kernel(args...) over grid x block (block.x threads; y = z = 1) with `smem` bytes of dynamic shared memory.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, Kernel kernel, Args... args) {
  std::vector<float> buf(smem / sizeof(float) + 4);
  block_dim = block, grid_dim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(buf.data(), 0xff, buf.size() * sizeof(float));  // NaN garbage: unstaged reads show up
        std::barrier<> bar(block.x);
        std::vector<float> exchange(block.x);
        block_barrier = &bar;
        block_exchange = &exchange;
        block_smem = buf.data();
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block.x; ++t)
          threads.emplace_back([&, t] {
            thread_idx = {t, 0, 0};
            block_idx = {bx, by, bz};
            kernel(args...);
          });
        for (auto& th : threads) th.join();
      }
}
}  // namespace hcml_emu

#define threadIdx (hcml_emu::thread_idx)
#define blockIdx (hcml_emu::block_idx)
#define blockDim (hcml_emu::block_dim)
#define gridDim (hcml_emu::grid_dim)
#define __syncthreads() hcml_emu::sync()

// A warp shuffle as every thread of the block exchanging through memory between two barriers: valid where, as in
// these kernels, all threads of the block reach each shuffle together.
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  auto& ex = *hcml_emu::block_exchange;
  const unsigned t = threadIdx.x;
  ex[t] = v;
  hcml_emu::sync();
  const float got = ex[(t & ~31u) | ((t & 31u) ^ static_cast<unsigned>(lane_mask))];
  hcml_emu::sync();
  return got;
}

// 16-bit floats with CUDA's conversion semantics (round to nearest even).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
inline float __half2float(__half v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
}
inline __half __float2half_rn(float f) {
  _Float16 h = static_cast<_Float16>(f);
  __half r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}
