// Cost-volume kernels for channels_last (NHWC) tensors: the layout the model runs in.
//
// Why separate kernels: with NHWC storage the channels of a pixel are contiguous, so a warp that walks pixels
// (as the strided kernels do) reads addresses C elements apart and no load is coalesced; the first H200 run
// spent 57 % of a training step in such a backward. Here every global load is a contiguous 16-byte vector of
// channels (or a scalar when C or the pointers do not allow vectors), staged into shared memory as
// [channel][y][x] so that the hot loops read shared memory without bank conflicts.
//
// One block = a TH x TW tile of pixels of one image, one thread per pixel, channels in chunks of CC:
// - forward:  acc[k] += f1[p, c] * f2[p + d_k, c] over an f2 tile with a halo of max_displacement pixels;
// - dL/df1:   g1[p, c] = sum_k g[p, k] * f2[p + d_k, c]   (the D*D grads of p in registers, f2 tile + halo);
// - dL/df2:   g2[q, c] = sum_k g[q - d_k, k] * f1[q - d_k, c]   (gathered grads in registers, f1 tile + halo).
// Each output element is written once (no atomics), in fp32 accumulation, cast to T at the store.
//
// The same source compiles for the GPU (nvcc) and, with HCML_EMULATE, for the CPU with g++ (emulation.h runs
// every CUDA thread as a host thread with real barriers), which is how the CPU-only test suite checks the
// indexing, the halos and the synchronisation of these kernels against a naive reference.
#pragma once

#ifdef HCML_EMULATE
#include "emulation.h"
#define HCML_DYNAMIC_SMEM(name) float* name = hcml_emu::shared_memory()
#else
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define HCML_DYNAMIC_SMEM(name)                         \
  extern __shared__ __align__(16) float hcml_smem_raw[]; \
  float* name = hcml_smem_raw
#endif

namespace hcml {

// fp32 accumulation for every element type (shared with the strided kernels of cost_volume_kernels.cu)
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

namespace nhwc {

constexpr int TW = 32;   // tile width: one warp per tile row
constexpr int TH = 8;    // tile height
constexpr int CC = 8;    // channels per shared-memory chunk
constexpr int THREADS = TW * TH;

struct Shape {
  int B, C, H, W, md, s;  // D = 2 * md / s + 1
};


// Elements of T in one 16-byte vector.
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };

// Stage channels [c0, c0 + CC) of an (h x w) window of image b, whose top-left is (y0, x0) in image coordinates,
// into dst[cc * h * w + row * w + col] as floats; outside the image or past C: 0.
template <typename T, bool kVec>
__device__ __forceinline__ void stage(float* __restrict__ dst, const T* __restrict__ src, const Shape& sh, int b,
                                      int y0, int x0, int h, int w, int c0) {
  const int npix = h * w;
  if (kVec) {
    constexpr int V = Vec<T>::N;
    constexpr int NV = (CC + V - 1) / V;  // vectors per pixel and chunk
    for (int item = threadIdx.x; item < npix * NV; item += THREADS) {
      const int pix = item / NV, v = item % NV;
      const int yy = y0 + pix / w, xx = x0 + pix % w, c = c0 + v * V;
      float vals[V];
      if (yy >= 0 && yy < sh.H && xx >= 0 && xx < sh.W && c < sh.C) {
        const uint4 raw = *reinterpret_cast<const uint4*>(src + ((static_cast<int64_t>(b) * sh.H + yy) * sh.W + xx) *
                                                                     sh.C + c);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < V; ++i) vals[i] = to_f(e[i]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) vals[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < V; ++i)
        if (v * V + i < CC) dst[(v * V + i) * npix + pix] = vals[i];
    }
  } else {
    for (int item = threadIdx.x; item < npix * CC; item += THREADS) {
      const int pix = item / CC, cc = item % CC;
      const int yy = y0 + pix / w, xx = x0 + pix % w, c = c0 + cc;
      float v = 0.f;
      if (yy >= 0 && yy < sh.H && xx >= 0 && xx < sh.W && c < sh.C)
        v = to_f(src[((static_cast<int64_t>(b) * sh.H + yy) * sh.W + xx) * sh.C + c]);
      dst[cc * npix + pix] = v;
    }
  }
}

// Write vals[0..CC) to channels [c0, c0 + CC) of pixel p (only those < C).
template <typename T, bool kVec>
__device__ __forceinline__ void store_chunk(T* __restrict__ dst, int64_t p, const Shape& sh, int c0, const float* vals) {
  if (kVec && c0 + CC <= sh.C) {
    constexpr int V = Vec<T>::N;
#pragma unroll
    for (int v = 0; v < CC / V; ++v) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < V; ++i) e[i] = from_f<T>(vals[v * V + i]);
      *reinterpret_cast<uint4*>(dst + p * sh.C + c0 + v * V) = raw;
    }
  } else {
#pragma unroll
    for (int cc = 0; cc < CC; ++cc)
      if (c0 + cc < sh.C) dst[p * sh.C + c0 + cc] = from_f<T>(vals[cc]);
  }
}

// out[p, i*D + j] = inv_c * sum_c f1[p, c] * f2[p + ((i - D/2) s, (j - D/2) s), c]
template <typename T, int D, bool kVec>
__global__ void __launch_bounds__(THREADS) forward(Shape sh, const T* __restrict__ f1, const T* __restrict__ f2,
                                                   T* __restrict__ out) {
  HCML_DYNAMIC_SMEM(smem);
  const int HH = TH + 2 * sh.md, WW = TW + 2 * sh.md;
  float* f2s = smem;                 // [CC][HH][WW]
  float* f1s = smem + CC * HH * WW;  // [CC][TH][TW]
  const int b = blockIdx.z, y0 = blockIdx.y * TH, x0 = blockIdx.x * TW;
  const int ty = threadIdx.x / TW, tx = threadIdx.x % TW;
  const int y = y0 + ty, x = x0 + tx;
  float acc[D * D];
#pragma unroll
  for (int k = 0; k < D * D; ++k) acc[k] = 0.f;
  for (int c0 = 0; c0 < sh.C; c0 += CC) {
    __syncthreads();  // the previous chunk is consumed
    stage<T, kVec>(f2s, f2, sh, b, y0 - sh.md, x0 - sh.md, HH, WW, c0);
    stage<T, kVec>(f1s, f1, sh, b, y0, x0, TH, TW, c0);
    __syncthreads();
#pragma unroll
    for (int cc = 0; cc < CC; ++cc) {
      const float a = f1s[cc * TH * TW + threadIdx.x];
      const float* base = f2s + cc * HH * WW + ty * WW + tx;  // displacement (-md, -md)
#pragma unroll
      for (int i = 0; i < D; ++i)
#pragma unroll
        for (int j = 0; j < D; ++j) acc[i * D + j] += a * base[i * sh.s * WW + j * sh.s];
    }
  }
  if (y < sh.H && x < sh.W) {
    const float inv = 1.f / sh.C;
    T* o = out + ((static_cast<int64_t>(b) * sh.H + y) * sh.W + x) * (D * D);
#pragma unroll
    for (int k = 0; k < D * D; ++k) o[k] = from_f<T>(acc[k] * inv);
  }
}

// One input's gradient per launch, without atomics: every element written once by the thread of its pixel.
//   kSecond = false: g1[p, c] = inv_c * sum_k g[p, k] * f2[p + d_k, c]          (src = f2, the grads of p)
//   kSecond = true:  g2[q, c] = inv_c * sum_k g[q - d_k, k] * f1[q - d_k, c]    (src = f1, the grads that read q)
// Both stage src's tile with its halo; the displacement k of a thread's pixel sits at tile offset (i s, j s),
// and its opposite -d_k at ((D-1-i) s, (D-1-j) s).
template <typename T, int D, bool kVec, bool kSecond>
__global__ void __launch_bounds__(THREADS) backward(Shape sh, const T* __restrict__ g, const T* __restrict__ src,
                                                    T* __restrict__ dst) {
  HCML_DYNAMIC_SMEM(tile);  // [CC][HH][WW]
  const int HH = TH + 2 * sh.md, WW = TW + 2 * sh.md;
  const int b = blockIdx.z, y0 = blockIdx.y * TH, x0 = blockIdx.x * TW;
  const int ty = threadIdx.x / TW, tx = threadIdx.x % TW;
  const int y = y0 + ty, x = x0 + tx;
  const bool inside = y < sh.H && x < sh.W;
  const float inv = 1.f / sh.C;
  float gk[D * D];  // the D*D grads this pixel combines, pre-scaled by 1/C
#pragma unroll
  for (int i = 0; i < D; ++i)
#pragma unroll
    for (int j = 0; j < D; ++j) {
      const int sign = kSecond ? -1 : 0;  // kSecond: the output pixel q - d_k that read this one
      const int yy = y + sign * (i - D / 2) * sh.s, xx = x + sign * (j - D / 2) * sh.s;
      const bool ok = inside && yy >= 0 && yy < sh.H && xx >= 0 && xx < sh.W;
      gk[i * D + j] =
          ok ? to_f(g[((static_cast<int64_t>(b) * sh.H + yy) * sh.W + xx) * (D * D) + i * D + j]) * inv : 0.f;
    }
  for (int c0 = 0; c0 < sh.C; c0 += CC) {
    __syncthreads();
    stage<T, kVec>(tile, src, sh, b, y0 - sh.md, x0 - sh.md, HH, WW, c0);
    __syncthreads();
    float vals[CC];
#pragma unroll
    for (int cc = 0; cc < CC; ++cc) {
      const float* base = tile + cc * HH * WW + ty * WW + tx;
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < D; ++i)
#pragma unroll
        for (int j = 0; j < D; ++j) {
          const int oy = kSecond ? D - 1 - i : i, ox = kSecond ? D - 1 - j : j;
          acc += gk[i * D + j] * base[oy * sh.s * WW + ox * sh.s];
        }
      vals[cc] = acc;
    }
    if (inside) store_chunk<T, kVec>(dst, (static_cast<int64_t>(b) * sh.H + y) * sh.W + x, sh, c0, vals);
  }
}

// Bytes of dynamic shared memory each kernel needs.
inline size_t smem_forward(const Shape& sh) {
  return sizeof(float) * CC * ((TH + 2 * sh.md) * (TW + 2 * sh.md) + TH * TW);
}
inline size_t smem_backward(const Shape& sh) { return sizeof(float) * CC * (TH + 2 * sh.md) * (TW + 2 * sh.md); }

}  // namespace nhwc
}  // namespace hcml
