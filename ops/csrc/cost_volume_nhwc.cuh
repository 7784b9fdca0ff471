// Cost-volume kernels over channels_last (NHWC) buffers: the only layout the op computes in. ops/_cuda.py hands
// every call over as (B, H, W, Cs) contiguous buffers, 16-byte aligned, Cs a multiple of one 16-byte vector (an
// input that is not so is copied once, zero-padded); these kernels therefore read and write only whole vectors.
//
// Two families:
// - fast<T, D, S>: (D, S) fixed at compile time (the models' D = 7, S = 2), so every shared-memory offset is an
//   immediate and the accumulators stay in registers. The pixels of a tile are split into S same-parity
//   sub-lattices ("classes": x = r + S u); along a class, the D horizontal displacements of neighbouring pixels
//   overlap, so one thread owns P = 4 consecutive lattice pixels and one displacement row i and reads each row
//   of the f2 window with three 16-byte shared loads for D * P = 28 FMAs (a plain per-pixel loop needs one load
//   per FMA, which caps a kernel at ~25 % of FMA peak). Tiles are TH x TW pixels; channels in chunks of 32 bytes
//   per pixel (one whole L2 sector) are staged as floats [channel][row][class][u], the next chunk of the f2
//   window fetched into registers while this one is used. The forward's output tile goes through shared memory
//   so that it leaves as contiguous 16-byte stores. The backward is fused: one kernel reads g once per tile and
//   writes dL/df1 and dL/df2; the D row partials of a pixel meet in one warp and are summed with a shuffle
//   reduce-scatter (no atomics, no reduction buffer: each element is written once).
// - generic<T>: any (D, S) at run time, one thread per output element (forward) or per pixel and channel vector
//   (backward), reading 16-byte vectors straight from global memory. Correct everywhere, not tuned.
//
// The same source compiles for the GPU (nvcc) and, with HCML_EMULATE, for the CPU with g++ (emulation.h runs every
// CUDA thread as a host thread with real barriers): the CPU test suite checks indexing, halos and barriers against
// a naive reference there, and ops/csrc/launch_config.cpp prints each kernel's threads and shared memory from the
// same constants for the static report.
#pragma once

#ifdef HCML_EMULATE
#include "emulation.h"
#define HCML_DYNAMIC_SMEM(name) float* name = hcml_emu::shared_memory()
#else
#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define HCML_DYNAMIC_SMEM(name)                         \
  extern __shared__ __align__(16) float hcml_smem_raw[]; \
  float* name = hcml_smem_raw
#endif

namespace hcml {

// fp32 accumulation for every element type
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

namespace nhwc {

// B, H, W: sizes; C: channels (the 1/C scale); Cs: channel stride of f1, f2, g1, g2 (C rounded up to a vector).
struct Shape {
  int B, C, Cs, H, W;
};

// Elements of T in one 16-byte vector, and the vector as floats.
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float* out) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) out[i] = to_f(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float* in) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) e[i] = from_f<T>(in[i]);
  return raw;
}

__device__ __forceinline__ int64_t pixel(const Shape& sh, int b, int y, int x) {
  return (static_cast<int64_t>(b) * sh.H + y) * sh.W + x;
}

// The forward's output tile, staged in shared memory as floats [TH][TW][DD] (already scaled), written as contiguous
// 16-byte stores per tile row (a row of the tile is one contiguous run of the NHWC output); the row's ragged ends
// element by element.
template <typename T, int TH, int TW, int DD, int NT>
__device__ __forceinline__ void store_out_tile(const float* __restrict__ tile, const Shape& sh, int b, int y0, int x0,
                                               T* __restrict__ out) {
  constexpr int V = Vec<T>::N;
  const int width = min(TW, sh.W - x0);
  for (int ty = 0; ty < TH && y0 + ty < sh.H; ++ty) {
    const int64_t start = pixel(sh, b, y0 + ty, x0) * DD, n = static_cast<int64_t>(width) * DD;
    const int64_t first = start / V, last = (start + n + V - 1) / V;  // 16-byte slots touching the row
    const float* src = tile + ty * TW * DD;                          // src[e - start] for global element e
    for (int64_t slot = first + threadIdx.x; slot < last; slot += NT) {
      const int64_t e0 = slot * V;
      if (e0 >= start && e0 + V <= start + n) {
        *reinterpret_cast<uint4*>(out + e0) = pack<T>(src + (e0 - start));
      } else {
        for (int64_t e = e0; e < e0 + V; ++e)
          if (e >= start && e < start + n) out[e] = from_f<T>(src[e - start]);
      }
    }
  }
}

// ---------------------------------------------------------------- compile-time (D, S) kernels
template <typename T, int D_, int S_>
struct Fast {
  static constexpr int D = D_, S = S_, HALF = D / 2, MD = HALF * S, DD = D * D;
  static constexpr int TH = 8, TW = 16, P = 4;                   // tile, pixels per thread
  static constexpr int TWC = TW / S, G = TWC / P;                 // lattice pixels per class, thread groups
  static constexpr int THREADS = D * TH * S * G;                  // forward: one per (row i, tile row, class, group)
  static constexpr int THREADS_BWD = 32 * TH;                     // backward: one warp per tile row (lane = q + 4 i)
  static constexpr int SH = (HALF + 3) / 4 * 4;                   // staged slot of lattice u = 0 (vector aligned)
  static constexpr int U = TWC + 2 * SH;                          // staged slots per class
  static constexpr int RS = S * U + (40 - (S * U) % 32) % 32;     // row stride = 8 (mod 32): no bank conflicts
  static constexpr int HH = TH + 2 * MD, WH = TW + 2 * MD;        // staged window with its halo
  static constexpr int V = Vec<T>::N;
  static constexpr int CC = 2 * V;   // forward chunk: 32 bytes of channels per pixel, one whole L2 sector
  static constexpr int CCB = V;      // backward chunk: 16 bytes (two windows staged at once)
  static constexpr int VB = (SH - HALF) / 4 * 4;                  // first vector a thread reads in its row
  static constexpr int NL = (SH - HALF + P + D - 1 + 3) / 4 - VB / 4;  // 16-byte shared loads per row
  static constexpr int OFF = SH - HALF - VB;                      // first useful float among them
  static_assert(TWC % P == 0 && THREADS % 32 == 0, "tile geometry");
  static_assert(S * G == 4 && D <= 8, "backward: a warp holds the 4 groups of a tile row x up to 8 rows i");

  static constexpr int PLANE_HALO = HH * RS, PLANE = TH * RS;  // floats per staged channel
  static constexpr int STAGE_FWD = CC * (PLANE_HALO + PLANE), OUT_TILE = TH * TW * DD;  // the output tile reuses it
  static constexpr int SMEM_FWD = 4 * (STAGE_FWD > OUT_TILE ? STAGE_FWD : OUT_TILE);
  static constexpr int OUTS = 2 * TH * TW * CCB;                  // the backward chunk's grads of the tile
  static constexpr int SMEM_BWD = 4 * (2 * CCB * PLANE_HALO + OUTS);

  // Items (pixel, vector) of a staged window: rows x cols pixels, CCW channels (NV vectors) each, NT threads.
  template <int ROWS, int COLS, int CCW, int NT>
  struct Window {
    static constexpr int NV = CCW / V, ITEMS = ROWS * COLS * NV, PER_THREAD = (ITEMS + NT - 1) / NT;
    uint4 buf[PER_THREAD];

    // Global → registers: channels [c0, c0 + CCW) of the window whose top-left pixel is (y0 - halo, x0 - halo).
    __device__ __forceinline__ void fetch(const T* __restrict__ src, const Shape& sh, int b, int y0, int x0,
                                          int c0) {
      constexpr int halo = (ROWS - TH) / 2;
#pragma unroll
      for (int n = 0; n < PER_THREAD; ++n) {
        const int item = threadIdx.x + n * NT;
        const int v = item % NV, pix = item / NV;
        const int y = y0 - halo + pix / COLS, x = x0 - halo + pix % COLS, c = c0 + v * V;
        buf[n] = make_zero();
        if (item < ITEMS && y >= 0 && y < sh.H && x >= 0 && x < sh.W && c < sh.Cs)
          buf[n] = *reinterpret_cast<const uint4*>(src + pixel(sh, b, y, x) * sh.Cs + c);
      }
    }

    // Registers → shared memory as floats [channel][row][class][slot].
    __device__ __forceinline__ void put(float* __restrict__ dst) const {
      constexpr int halo = (ROWS - TH) / 2;
#pragma unroll
      for (int n = 0; n < PER_THREAD; ++n) {
        const int item = threadIdx.x + n * NT;
        if (item >= ITEMS) break;
        const int v = item % NV, pix = item / NV;
        const int row = pix / COLS, xr = pix % COLS - halo;  // x relative to the tile's left edge
        const int r = ((xr % S) + S) % S, slot = SH + (xr - r) / S;
        float vals[V];
        unpack<T>(buf[n], vals);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const int cc = v * V + e;
          dst[(cc * ROWS + row) * RS + r * U + slot] = vals[e];
        }
      }
    }
  };

  __device__ static __forceinline__ uint4 make_zero() {
    uint4 z;
    z.x = z.y = z.z = z.w = 0u;
    return z;
  }

  // The NL vectors (4 floats each) of one staged row a thread reads; useful floats start at OFF.
  __device__ static __forceinline__ void read_row(const float* __restrict__ p, float* out) {
#pragma unroll
    for (int l = 0; l < NL; ++l) {
      const float4 q = reinterpret_cast<const float4*>(p)[l];
      out[4 * l] = q.x, out[4 * l + 1] = q.y, out[4 * l + 2] = q.z, out[4 * l + 3] = q.w;
    }
  }

  struct Thread {
    int i, ty, r, g;
    __device__ __forceinline__ Thread() {
      const int t = threadIdx.x;
      g = t % G, r = (t / G) % S, ty = (t / (G * S)) % TH, i = t / (G * S * TH);
    }
    // x of this thread's p-th pixel relative to the tile, and its index in the tile (row-major)
    __device__ __forceinline__ int xr(int p) const { return r + S * (P * g + p); }
    __device__ __forceinline__ int px(int p) const { return ty * TW + xr(p); }
  };
};

// out[p, i*D + j] = 1/C sum_c f1[p, c] * f2[p + ((i - D/2) S, (j - D/2) S), c]   (f2 = 0 outside the image)
template <typename T, int D, int S>
__global__ void __launch_bounds__(Fast<T, D, S>::THREADS, 2)
    forward_fast(Shape sh, const T* __restrict__ f1, const T* __restrict__ f2, T* __restrict__ out) {
  using K = Fast<T, D, S>;
  HCML_DYNAMIC_SMEM(smem);
  float* f2s = smem;                             // [CC][HH][RS]
  float* f1s = smem + K::CC * K::PLANE_HALO;     // [CC][TH][RS]
  const int b = blockIdx.z, y0 = blockIdx.y * K::TH, x0 = blockIdx.x * K::TW;
  const typename K::Thread th;
  typename K::template Window<K::HH, K::WH, K::CC, K::THREADS> w2;
  typename K::template Window<K::TH, K::TW, K::CC, K::THREADS> w1;
  float acc[D][K::P];
#pragma unroll
  for (int j = 0; j < D; ++j)
#pragma unroll
    for (int p = 0; p < K::P; ++p) acc[j][p] = 0.f;
  w2.fetch(f2, sh, b, y0, x0, 0);
  for (int c0 = 0; c0 < sh.Cs; c0 += K::CC) {
    __syncthreads();  // the previous chunk is consumed
    w2.put(f2s);
    w1.fetch(f1, sh, b, y0, x0, c0);  // the small f1 tile is not prefetched: its registers would spill
    w1.put(f1s);
    __syncthreads();
    if (c0 + K::CC < sh.Cs) w2.fetch(f2, sh, b, y0, x0, c0 + K::CC);  // flies while this chunk is used
#pragma unroll 1
    for (int cc = 0; cc < K::CC; ++cc) {
      const float4 a = *reinterpret_cast<const float4*>(f1s + (cc * K::TH + th.ty) * K::RS + th.r * K::U + K::SH +
                                                        K::P * th.g);
      const float av[4] = {a.x, a.y, a.z, a.w};
      float row[4 * K::NL];
      K::read_row(f2s + (cc * K::HH + th.ty + th.i * S) * K::RS + th.r * K::U + K::VB + K::P * th.g, row);
#pragma unroll
      for (int j = 0; j < D; ++j)
#pragma unroll
        for (int p = 0; p < K::P; ++p) acc[j][p] += av[p] * row[K::OFF + p + j];
    }
  }
  // the output tile [TH][TW][DD] through shared memory, then contiguous 16-byte stores per tile row
  __syncthreads();
  const float inv = 1.f / sh.C;
#pragma unroll
  for (int j = 0; j < D; ++j)
#pragma unroll
    for (int p = 0; p < K::P; ++p) smem[th.px(p) * K::DD + th.i * D + j] = acc[j][p] * inv;
  __syncthreads();
  store_out_tile<T, K::TH, K::TW, K::DD, K::THREADS>(smem, sh, b, y0, x0, out);
}

// Fused backward: g1[p, c] = 1/C sum_k g[p, k] f2[p + d_k, c] and g2[q, c] = 1/C sum_k g[q - d_k, k] f1[q - d_k, c].
// One warp per tile row; lane q + 4 i holds, for displacement row i (i = 7: idle, zeros) and the 4 pixels of
// group q, the D grads of each pixel (ga) and the D grads that read it (gb). Per channel, each lane forms 8 row
// partials (4 pixels x {g1, g2}); a butterfly reduce-scatter over the 8 lanes of a group (7 shuffles) leaves lane
// i with the full sum of partial i, which it writes to shared memory: no atomics, no reduction buffer, two
// barriers per chunk.
template <typename T, int D, int S>
__global__ void __launch_bounds__(Fast<T, D, S>::THREADS_BWD, 2)
    backward_fast(Shape sh, const T* __restrict__ g, const T* __restrict__ f1, const T* __restrict__ f2,
                  T* __restrict__ g1, T* __restrict__ g2) {
  using K = Fast<T, D, S>;
  constexpr int P = K::P, HALF = K::HALF, NPX = K::TH * K::TW, CCB = K::CCB;
  HCML_DYNAMIC_SMEM(smem);
  float* f2s = smem;                          // [CCB][HH][RS]
  float* f1s = smem + CCB * K::PLANE_HALO;    // [CCB][HH][RS]
  float* outs = f1s + CCB * K::PLANE_HALO;    // [2][NPX][CCB]: the chunk's grads
  const int b = blockIdx.z, y0 = blockIdx.y * K::TH, x0 = blockIdx.x * K::TW;
  const int lane = threadIdx.x % 32, ty = threadIdx.x / 32, q = lane % 4, i = lane / 4;
  const int r = q / K::G, gq = q % K::G;  // class and group of lane's pixels
  const bool active = i < D;
  auto xr = [&](int p) { return r + S * (P * gq + p); };
  const float inv = 1.f / sh.C;
  float ga[D][P], gb[D][P];
  const int y = y0 + ty;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int x = x0 + xr(p);
    const bool inside = active && y < sh.H && x < sh.W;
#pragma unroll
    for (int j = 0; j < D; ++j) {
      const int k = i * D + j;
      ga[j][p] = inside ? to_f(g[pixel(sh, b, y, x) * K::DD + k]) * inv : 0.f;
      const int yy = y - (i - HALF) * S, xx = x - (j - HALF) * S;  // the pixel whose displacement k reads q
      const bool ok = inside && yy >= 0 && yy < sh.H && xx >= 0 && xx < sh.W;
      gb[j][p] = ok ? to_f(g[pixel(sh, b, yy, xx) * K::DD + k]) * inv : 0.f;
    }
  }
  // my partial index (which * 4 + p) after the reduce-scatter is i; its pixel in the tile
  const int mine_which = i / 4, mine_px = ty * K::TW + xr(i % 4);
  for (int c0 = 0; c0 < sh.Cs; c0 += CCB) {
    {
      typename K::template Window<K::HH, K::WH, CCB, K::THREADS_BWD> w;
      w.fetch(f2, sh, b, y0, x0, c0);  // the previous chunk's last barrier has passed: its tiles are consumed
      w.put(f2s);
      w.fetch(f1, sh, b, y0, x0, c0);
      w.put(f1s);
    }
    __syncthreads();
#pragma unroll 2
    for (int cc = 0; cc < CCB; ++cc) {
      float v[8];
#pragma unroll
      for (int n = 0; n < 8; ++n) v[n] = 0.f;
      if (active) {
        float row2[4 * K::NL], row1[4 * K::NL];
        K::read_row(f2s + (cc * K::HH + ty + i * S) * K::RS + r * K::U + K::VB + P * gq, row2);
        K::read_row(f1s + (cc * K::HH + ty + (D - 1 - i) * S) * K::RS + r * K::U + K::VB + P * gq, row1);
#pragma unroll
        for (int p = 0; p < P; ++p)
#pragma unroll
          for (int j = 0; j < D; ++j) {
            v[p] += ga[j][p] * row2[K::OFF + p + j];
            v[4 + p] += gb[j][p] * row1[K::OFF + p + 2 * HALF - j];
          }
      }
      // reduce-scatter over lane bits 4, 3, 2 (i's bits 2, 1, 0): keep the half named by my bit, add the other's
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        const bool hi = i & 4;
        const float sent = hi ? v[n] : v[n + 4];
        const float got = __shfl_xor_sync(0xffffffffu, sent, 16);
        v[n] = (hi ? v[n + 4] : v[n]) + got;
      }
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        const bool hi = i & 2;
        const float got = __shfl_xor_sync(0xffffffffu, hi ? v[n] : v[n + 2], 8);
        v[n] = (hi ? v[n + 2] : v[n]) + got;
      }
      {
        const bool hi = i & 1;
        const float got = __shfl_xor_sync(0xffffffffu, hi ? v[0] : v[1], 4);
        v[0] = (hi ? v[1] : v[0]) + got;
      }
      outs[(mine_which * NPX + mine_px) * CCB + cc] = v[0];
    }
    __syncthreads();
    // the chunk's CCB channels of every pixel of the tile: one 16-byte store each
    for (int job = threadIdx.x; job < 2 * NPX; job += K::THREADS_BWD) {
      const int which = job / NPX, px = job % NPX;
      const int yy = y0 + px / K::TW, xx = x0 + px % K::TW;
      if (yy < sh.H && xx < sh.W && c0 < sh.Cs) {
        T* dst = which ? g2 : g1;
        *reinterpret_cast<uint4*>(dst + pixel(sh, b, yy, xx) * sh.Cs + c0) = pack<T>(outs + job * CCB);
      }
    }
  }
}

// The grid of a tiled kernel family K (Fast or Tc): one block per TH x TW tile of each image.
template <typename K>
inline dim3 tile_grid(const Shape& sh) {
  dim3 grid;
  grid.x = (sh.W + K::TW - 1) / K::TW, grid.y = (sh.H + K::TH - 1) / K::TH, grid.z = sh.B;
  return grid;
}

// ---------------------------------------------------------------- tensor cores: bf16 / fp16, compile-time (D, S)
// ldmatrix + mma.sync.m16n8k16 (sm_80 and later; the dispatch checks the device). emulation.h emulates both.
#ifdef HCML_EMULATE
template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  ldmatrix_x4_emulated<Trans>(r, row);
}
template <typename E>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_16816_emulated<E>(c, a, b);
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  cp_async_16_emulated(dst, src, valid);
}
__device__ __forceinline__ void cp_async_commit() { cp_async_commit_emulated(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { cp_async_wait_emulated(N); }
#else
template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if __CUDA_ARCH__ >= 800
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
#else
  r[0] = r[1] = r[2] = r[3] = 0u;  // not launched below sm_80
#endif
}
template <typename E>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<E, __half>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
// 16 bytes global → shared without passing through registers; zeros when !valid (src is then not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#if __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#endif

// The cost volume as local GEMMs. Pixels of one parity class (y = ry + S v, x = rx + S u) see each other only at
// whole lattice steps, so on a class's lattice the op is a plain D x D neighbourhood correlation. A warp takes
// QB x QB = 16 lattice pixels (one m16 tile); every key any of them reads lies in one KW x KW = 100-pixel window
// (13 n8 tiles). Forward: one 16 x 104 x C GEMM per warp, of which the 16 x 49 products in each query's window are
// kept (47 %). Backward: g1 (the warp's pixels as queries) = G (16 x 112: their grads placed at the window's keys)
// x the f2 window; g2 (the warp's pixels as keys) = G' (16 x 112: the grads of the window's queries that read
// them) x the f1 window. ldmatrix takes one row address per lane, so the lattice gather is free: the rows of A
// and B are pixels of the staged, class-split windows.
//
// Shared memory: pixels as T, classes split, KC channels per pixel plus 16 bytes of padding, so a pixel is
// M = KC / 8 + 1 (odd) 16-byte units; a window row is RU = KW M (mod 8) units, so key k (row-major in a warp's
// window) starts at unit M k + const (mod 8): the 8 rows of each ldmatrix phase fall in 8 different bank groups.
// A query-tile row is RA = QB M (mod 8) units, for the same reason.
template <typename T, int D_, int S_>
struct Tc {
  static constexpr int D = D_, S = S_, HALF = D / 2, MD = HALF * S, DD = D * D;
  static constexpr int QB = 4, LH = 4, LW = 8;                 // a warp's 4 x 4 pixels; lattice pixels per class
  static constexpr int TH = S * LH, TW = S * LW;               // the tile: 8 x 16 pixels
  static constexpr int BX = LW / QB, WARPS = S * S * BX, THREADS = 32 * WARPS;  // LH == QB: one block row
  static constexpr int KW = QB + D - 1, NK = KW * KW;          // a warp's window: 10 x 10 pixels
  static constexpr int NT = (NK + 7) / 8, KSTEPS = (NK + 15) / 16;  // forward n8 tiles, backward k16 steps
  static constexpr int WH = LH + D - 1, WW = LW + D - 1;       // a class's window: 10 x 14 lattice pixels
  static constexpr int V = Vec<T>::N;
  static constexpr int KC_FWD = 16, KC_BWD = 16;               // channels per pixel and chunk
  static_assert(sizeof(T) == 2 && LH == QB && MD % S == 0, "tensor-core geometry");

  static constexpr int congruent(int base, int target) { return base + ((target - base) % 8 + 8) % 8; }
  template <int KC>
  struct Layout {  // in 16-byte units
    static constexpr int M = KC / 8 + 1, RU = congruent(WW * M, KW * M % 8), RA = congruent(LW * M, QB * M % 8);
    static constexpr int WIN = S * S * WH * RU, TILE = S * S * LH * RA;
  };
  using LF = Layout<KC_FWD>;
  using LB = Layout<KC_BWD>;
  static constexpr int OUT_TILE = 4 * TH * TW * DD;             // bytes: the forward's output tile (floats)
  static constexpr int STAGE_FWD = LF::WIN + LF::TILE;          // units: one chunk's f2 window and f1 tile
  static constexpr int SMEM_FWD = 2 * 16 * STAGE_FWD > OUT_TILE ? 2 * 16 * STAGE_FWD : OUT_TILE;  // two stages
  static constexpr int NPX = TH * TW, OUTS = 2 * NPX * KC_BWD;  // floats: the backward chunk's two grads
  static constexpr int SMEM_BWD = 16 * 2 * LB::WIN + 4 * OUTS;

  struct Lane {
    int warp, lane, cls, ry, rx, bx, g, q;
    __device__ __forceinline__ Lane() {
      warp = threadIdx.x / 32, lane = threadIdx.x % 32, cls = warp / BX, bx = warp % BX;
      ry = cls / S, rx = cls % S, g = lane / 4, q = lane % 4;
    }
    // tile-relative y, x of row a (0..15) of the warp's pixels, and of window pixel w (0..NK-1)
    __device__ __forceinline__ int ay(int a) const { return S * (a / QB) + ry; }
    __device__ __forceinline__ int ax(int a) const { return S * (QB * bx + a % QB) + rx; }
    __device__ __forceinline__ int wy(int w) const { return S * (w / KW - HALF) + ry; }
    __device__ __forceinline__ int wx(int w) const { return S * (QB * bx + w % KW - HALF) + rx; }
    // 16-byte unit of window pixel w (its channel 0) in a staged window of layout L. A w past the window (the
    // padding of the last n8 / k16 tile: its products are unused or multiplied by zero) reads a pixel of the
    // window with the same residue mod 8, so that its ldmatrix phase stays free of bank conflicts.
    template <typename L>
    __device__ __forceinline__ int win_unit(int w) const {
      while (w >= NK) w -= 8;
      return (cls * WH + w / KW) * L::RU + (QB * bx + w % KW) * L::M;
    }
  };

  // Channels [c0, c0 + KC) of pixels [y0 - HALO, y0 + TH + HALO) x [x0 - HALO, x0 + TW + HALO), zeros outside the
  // image and past Cs, into the class-split layout (row stride RS units), as cp.async copies: no registers held,
  // every copy of the thread in flight at once; the caller commits and waits.
  template <int KC, int HALO, int RS>
  __device__ static __forceinline__ void stage(uint4* __restrict__ dst, const T* __restrict__ src, const Shape& sh,
                                               int b, int y0, int x0, int c0) {
    constexpr int M = KC / 8 + 1, NV = KC / V, ROWS = TH + 2 * HALO, COLS = TW + 2 * HALO, ITEMS = ROWS * COLS * NV;
#pragma unroll 2
    for (int item = threadIdx.x; item < ITEMS; item += THREADS) {
      const int v = item % NV, pix = item / NV, yr = pix / COLS, xr = pix % COLS;
      const int y = y0 - HALO + yr, x = x0 - HALO + xr, c = c0 + v * V;
      const bool ok = y >= 0 && y < sh.H && x >= 0 && x < sh.W && c < sh.Cs;
      cp_async_16(dst + (((yr % S) * S + xr % S) * (ROWS / S) + yr / S) * RS + (xr / S) * M + v,
                  ok ? src + pixel(sh, b, y, x) * sh.Cs + c : src, ok);
    }
  }
};

template <typename T>
__device__ __forceinline__ uint16_t bits_of(T v) {
  uint16_t u;
  memcpy(&u, &v, 2);
  return u;
}

// out[p, i*D + j] = 1/C sum_c f1[p, c] * f2[p + ((i - D/2) S, (j - D/2) S), c]: per chunk of 16 channels, A (the
// warp's 16 pixels, from the f1 tile) times B (its 100-pixel f2 window) into 13 fp32 accumulator tiles; at the end
// each accumulator that is inside its query's window goes to the output tile.
template <typename T, int D, int S>
__global__ void __launch_bounds__(Tc<T, D, S>::THREADS, 2)
    forward_tc(Shape sh, const T* __restrict__ f1, const T* __restrict__ f2, T* __restrict__ out) {
  using K = Tc<T, D, S>;
  using L = typename K::LF;
  HCML_DYNAMIC_SMEM(smem);
  uint4* const stages = reinterpret_cast<uint4*>(smem);  // two stages of [f2 window | f1 tile]
  const int b = blockIdx.z, y0 = blockIdx.y * K::TH, x0 = blockIdx.x * K::TW;
  const typename K::Lane ln;
  const int j = ln.lane / 8, r = ln.lane % 8;
  // ldmatrix row of this lane: A matrix j = rows r + 8 (j % 2), channels 8 (j / 2); B matrix j of n-tile pair tp
  // = keys 8 (2 tp + j / 2) + r, channels 8 (j % 2).
  const int arow = r + 8 * (j % 2);
  const int a_unit = (ln.cls * K::LH + arow / K::QB) * L::RA + (K::QB * ln.bx + arow % K::QB) * L::M + j / 2;
  constexpr int PAIRS = (K::NT + 1) / 2;
  int b_unit[PAIRS];
#pragma unroll
  for (int tp = 0; tp < PAIRS; ++tp) {
    const int key = 8 * (2 * tp + j / 2) + r;
    b_unit[tp] = ln.template win_unit<L>(key) + j % 2;
  }
  float acc[K::NT][4];
#pragma unroll
  for (int t = 0; t < K::NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
  // chunk n is computed from stage n % 2 while chunk n + 1 is copied into the other (cp.async double buffering)
  K::template stage<K::KC_FWD, K::MD, L::RU>(stages, f2, sh, b, y0, x0, 0);
  K::template stage<K::KC_FWD, 0, L::RA>(stages + L::WIN, f1, sh, b, y0, x0, 0);
  cp_async_commit();
  for (int c0 = 0, n = 0; c0 < sh.Cs; c0 += K::KC_FWD, ++n) {
    uint4* const win = stages + (n % 2) * K::STAGE_FWD;  // the f2 window
    uint4* const til = win + L::WIN;                     // the f1 tile
    if (c0 + K::KC_FWD < sh.Cs) {  // the other stage was released by the barrier that ended the last chunk
      uint4* const next = stages + ((n + 1) % 2) * K::STAGE_FWD;
      K::template stage<K::KC_FWD, K::MD, L::RU>(next, f2, sh, b, y0, x0, c0 + K::KC_FWD);
      K::template stage<K::KC_FWD, 0, L::RA>(next + L::WIN, f1, sh, b, y0, x0, c0 + K::KC_FWD);
    }
    cp_async_commit();   // (an empty group on the last chunk keeps the count uniform)
    cp_async_wait<1>();  // this thread's copies of chunk n have landed
    __syncthreads();     // and everyone's
#pragma unroll 1
    for (int ks = 0; ks < K::KC_FWD / 16; ++ks) {  // not unrolled: 13 fragments in flight are enough
      uint32_t a[4];
      ldmatrix_x4<false>(a, til + a_unit + 2 * ks);
#pragma unroll
      for (int tp = 0; tp < PAIRS; ++tp) {
        uint32_t bq[4];
        ldmatrix_x4<false>(bq, win + b_unit[tp] + 2 * ks);
        const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
        mma_16816<T>(acc[2 * tp], a, b0);
        if (2 * tp + 1 < K::NT) mma_16816<T>(acc[2 * tp + 1], a, b1);
      }
    }
    __syncthreads();  // chunk n's stage is consumed: the next iteration may refill it
  }
  // the output tile [TH][TW][DD] reuses the staging space (the last barrier passed; no copy is pending)
  const float inv = 1.f / sh.C;
#pragma unroll
  for (int t = 0; t < K::NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = 8 * t + 2 * ln.q + e % 2, row = ln.g + 8 * (e / 2);  // accumulator element (row, key)
      const int i = key / K::KW - row / K::QB, jj = key % K::KW - row % K::QB;
      if (key < K::NK && i >= 0 && i < D && jj >= 0 && jj < D)
        smem[(ln.ay(row) * K::TW + ln.ax(row)) * K::DD + i * D + jj] = acc[t][e] * inv;
    }
  __syncthreads();
  store_out_tile<T, K::TH, K::TW, K::DD, K::THREADS>(smem, sh, b, y0, x0, out);
}

// Fused backward. A operands built once from g (C-independent, in registers): ga[s] rows = the warp's pixels p,
// columns = window keys w (g[p, k] where w = p + d_k), gb[s] rows = the warp's pixels q as keys, columns = window
// pixels w as queries (g[w, k] where q = w + d_k). Per chunk of 16 channels: g1 = ga x (f2 window), g2 = gb x (f1
// window), through shared memory to 16-byte stores; each grad element is written once.
template <typename T, int D, int S>
__global__ void __launch_bounds__(Tc<T, D, S>::THREADS, 2)
    backward_tc(Shape sh, const T* __restrict__ g, const T* __restrict__ f1, const T* __restrict__ f2,
                T* __restrict__ g1, T* __restrict__ g2) {
  using K = Tc<T, D, S>;
  using L = typename K::LB;
  constexpr int KC = K::KC_BWD, NPX = K::NPX, HALF = K::HALF, V = K::V;
  HCML_DYNAMIC_SMEM(smem);
  uint4* w2 = reinterpret_cast<uint4*>(smem);             // the f2 window
  uint4* w1 = w2 + L::WIN;                                // the f1 window
  float* outs = reinterpret_cast<float*>(w1 + L::WIN);    // [2][NPX][KC]
  const int b = blockIdx.z, y0 = blockIdx.y * K::TH, x0 = blockIdx.x * K::TW;
  const typename K::Lane ln;
  auto inside = [&](int y, int x) { return y >= 0 && y < sh.H && x >= 0 && x < sh.W; };
  uint32_t ga[K::KSTEPS][4], gb[K::KSTEPS][4];
#pragma unroll
  for (int s = 0; s < K::KSTEPS; ++s)
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      uint32_t wa = 0u, wb = 0u;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = ln.g + 8 * (n % 2), w = 16 * s + 8 * (n / 2) + 2 * ln.q + h;  // fragment element
        const int py = y0 + ln.ay(row), px = x0 + ln.ax(row), qy = y0 + ln.wy(w), qx = x0 + ln.wx(w);
        const int di = w / K::KW - row / K::QB, dj = w % K::KW - row % K::QB;  // row's displacement to w
        uint16_t va = 0, vb = 0;
        if (w < K::NK && inside(py, px) && inside(qy, qx)) {
          if (di >= 0 && di < D && dj >= 0 && dj < D) va = bits_of(g[pixel(sh, b, py, px) * K::DD + di * D + dj]);
          const int i2 = 2 * HALF - di, j2 = 2 * HALF - dj;  // w's displacement to row's pixel
          if (i2 >= 0 && i2 < D && j2 >= 0 && j2 < D) vb = bits_of(g[pixel(sh, b, qy, qx) * K::DD + i2 * D + j2]);
        }
        wa |= static_cast<uint32_t>(va) << (16 * h);
        wb |= static_cast<uint32_t>(vb) << (16 * h);
      }
      ga[s][n] = wa, gb[s][n] = wb;
    }
  // ldmatrix.trans rows of this lane: window keys 16 s + 8 (j % 2) + r, channels 8 (j / 2)
  const int j = ln.lane / 8, r = ln.lane % 8;
  int k_unit[K::KSTEPS];
#pragma unroll
  for (int s = 0; s < K::KSTEPS; ++s) {
    const int key = 16 * s + 8 * (j % 2) + r;
    k_unit[s] = ln.template win_unit<L>(key) + j / 2;
  }
  const float inv = 1.f / sh.C;
  for (int c0 = 0; c0 < sh.Cs; c0 += KC) {
    K::template stage<KC, K::MD, L::RU>(w2, f2, sh, b, y0, x0, c0);  // the last barrier passed: windows consumed
    K::template stage<KC, K::MD, L::RU>(w1, f1, sh, b, y0, x0, c0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();  // everyone's copies of this chunk have landed
    float a1[KC / 8][4], a2[KC / 8][4];
#pragma unroll
    for (int n = 0; n < KC / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) a1[n][e] = a2[n][e] = 0.f;
#pragma unroll
    for (int s = 0; s < K::KSTEPS; ++s)
#pragma unroll
      for (int p = 0; p < KC / 16; ++p) {
        uint32_t bq[4];
        ldmatrix_x4<true>(bq, w2 + k_unit[s] + 2 * p);
        const uint32_t b0[2] = {bq[0], bq[1]}, b1[2] = {bq[2], bq[3]};
        mma_16816<T>(a1[2 * p], ga[s], b0);
        mma_16816<T>(a1[2 * p + 1], ga[s], b1);
        ldmatrix_x4<true>(bq, w1 + k_unit[s] + 2 * p);
        const uint32_t c0b[2] = {bq[0], bq[1]}, c1b[2] = {bq[2], bq[3]};
        mma_16816<T>(a2[2 * p], gb[s], c0b);
        mma_16816<T>(a2[2 * p + 1], gb[s], c1b);
      }
#pragma unroll
    for (int n = 0; n < KC / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = ln.g + 8 * (e / 2), ch = 8 * n + 2 * ln.q + e % 2;
        const int px = ln.ay(row) * K::TW + ln.ax(row);
        outs[px * KC + ch] = a1[n][e] * inv;
        outs[(NPX + px) * KC + ch] = a2[n][e] * inv;
      }
    __syncthreads();  // outs is complete, and the windows are consumed: the next chunk may refill them
    for (int job = threadIdx.x; job < 2 * NPX * (KC / V); job += K::THREADS) {
      const int v = job % (KC / V), px = (job / (KC / V)) % NPX, which = job / (NPX * (KC / V));
      const int yy = y0 + px / K::TW, xx = x0 + px % K::TW, c = c0 + v * V;
      if (yy < sh.H && xx < sh.W && c < sh.Cs)
        *reinterpret_cast<uint4*>((which ? g2 : g1) + pixel(sh, b, yy, xx) * sh.Cs + c) =
            pack<T>(outs + (which * NPX + px) * KC + v * V);
    }
  }
}

// ---------------------------------------------------------------- any (D, S): plain, vector loads, no tiles
constexpr int GENERIC_THREADS = 256;

// One thread per output element (pixel, k): consecutive threads write consecutive elements.
template <typename T>
__global__ void __launch_bounds__(GENERIC_THREADS)
    forward_generic(Shape sh, int D, int s, const T* __restrict__ f1, const T* __restrict__ f2, T* __restrict__ out) {
  constexpr int V = Vec<T>::N;
  const int DD = D * D;
  const int64_t n = static_cast<int64_t>(sh.B) * sh.H * sh.W * DD;
  const float inv = 1.f / sh.C;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int k = t % DD;
    const int64_t p = t / DD;
    const int x = p % sh.W, y = (p / sh.W) % sh.H, b = p / (static_cast<int64_t>(sh.W) * sh.H);
    const int yy = y + (k / D - D / 2) * s, xx = x + (k % D - D / 2) * s;
    float acc = 0.f;
    if (yy >= 0 && yy < sh.H && xx >= 0 && xx < sh.W) {
      const T* a = f1 + p * sh.Cs;
      const T* q = f2 + pixel(sh, b, yy, xx) * sh.Cs;
      for (int c = 0; c < sh.Cs; c += V) {
        float va[V], vb[V];
        unpack<T>(*reinterpret_cast<const uint4*>(a + c), va);
        unpack<T>(*reinterpret_cast<const uint4*>(q + c), vb);
#pragma unroll
        for (int e = 0; e < V; ++e) acc += va[e] * vb[e];
      }
    }
    out[t] = from_f<T>(acc * inv);
  }
}

// One thread per (pixel, channel vector), both input grads at once (g read once per use).
template <typename T>
__global__ void __launch_bounds__(GENERIC_THREADS)
    backward_generic(Shape sh, int D, int s, const T* __restrict__ g, const T* __restrict__ f1,
                     const T* __restrict__ f2, T* __restrict__ g1, T* __restrict__ g2) {
  constexpr int V = Vec<T>::N;
  const int DD = D * D, nv = sh.Cs / V;
  const int64_t n = static_cast<int64_t>(sh.B) * sh.H * sh.W * nv;
  const float inv = 1.f / sh.C;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = (t % nv) * V;
    const int64_t p = t / nv;
    const int x = p % sh.W, y = (p / sh.W) % sh.H, b = p / (static_cast<int64_t>(sh.W) * sh.H);
    float a1[V] = {}, a2[V] = {}, v[V];
    for (int k = 0; k < DD; ++k) {
      const int dy = (k / D - D / 2) * s, dx = (k % D - D / 2) * s;
      if (y + dy >= 0 && y + dy < sh.H && x + dx >= 0 && x + dx < sh.W) {
        const float gk = to_f(g[p * DD + k]);
        unpack<T>(*reinterpret_cast<const uint4*>(f2 + pixel(sh, b, y + dy, x + dx) * sh.Cs + c), v);
#pragma unroll
        for (int e = 0; e < V; ++e) a1[e] += gk * v[e];
      }
      if (y - dy >= 0 && y - dy < sh.H && x - dx >= 0 && x - dx < sh.W) {
        const int64_t q = pixel(sh, b, y - dy, x - dx);
        const float gk = to_f(g[q * DD + k]);
        unpack<T>(*reinterpret_cast<const uint4*>(f1 + q * sh.Cs + c), v);
#pragma unroll
        for (int e = 0; e < V; ++e) a2[e] += gk * v[e];
      }
    }
#pragma unroll
    for (int e = 0; e < V; ++e) a1[e] *= inv, a2[e] *= inv;
    *reinterpret_cast<uint4*>(g1 + p * sh.Cs + c) = pack<T>(a1);
    *reinterpret_cast<uint4*>(g2 + p * sh.Cs + c) = pack<T>(a2);
  }
}

inline int generic_blocks(int64_t n) {
  const int64_t blocks = (n + GENERIC_THREADS - 1) / GENERIC_THREADS;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

}  // namespace nhwc
}  // namespace hcml
