// Just enough of CUDA, on the CPU, to run this project's NHWC kernels unchanged under g++ (-DHCML_EMULATE,
// C++20, -pthread): each CUDA thread of a block is a host thread, dynamic shared memory is one buffer per block,
// and the half / bfloat16 types convert with round-to-nearest-even. Blocks run one after another.
//
// Warps take turns: between two __syncthreads() one warp runs (its 32 lanes together, as the warp collectives
// below need), then the next, in ascending or descending warp order (`schedule`). A deterministic schedule, not
// whatever the host's scheduler does: run once in each order, every pair of warps meets in both orders within
// each barrier interval, so a missing __syncthreads() (shared memory one warp writes and another reads in the
// same interval) changes the values in one of the two runs, on every machine, every time. Slow, but it executes
// the same index arithmetic, halos and synchronisation as the GPU, which is what tests/test_cost_volume.py checks
// against a naive reference.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <semaphore>
#include <unordered_map>
#include <thread>
#include <type_traits>
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
enum class Schedule { kAscending, kDescending };
inline Schedule schedule = Schedule::kAscending;  // set by the caller between launches
struct Warp {
  unsigned lanes;
  std::barrier<> lanes_meet;               // the warp's collectives, and the end of its turn
  std::counting_semaphore<32> go{0};       // one permit per lane: the warp's turn
  explicit Warp(unsigned n) : lanes(n), lanes_meet(n) {}
};
inline std::vector<std::unique_ptr<Warp>>* block_warps = nullptr;
inline unsigned next_warp(unsigned w) {
  const unsigned n = static_cast<unsigned>(block_warps->size());
  return schedule == Schedule::kAscending ? (w + 1) % n : (w + n - 1) % n;
}
inline std::vector<float>* block_exchange = nullptr;  // one slot per thread, for warp shuffles
inline std::vector<const void*>* block_addresses = nullptr;  // one per thread, for ldmatrix
inline std::vector<uint32_t>* block_words = nullptr;  // six per thread, for mma fragments
inline float* block_smem = nullptr;
// ldmatrix phases (8 rows of 16 bytes) whose rows share a bank group: each costs the hardware a replay
inline std::atomic<long> ldmatrix_phases{0}, ldmatrix_conflicted_phases{0};
inline float* shared_memory() { return block_smem; }
// The lanes of this thread's warp meet (the emulated warp collectives exchange through memory between two).
inline void sync() { (*block_warps)[thread_idx.x / 32]->lanes_meet.arrive_and_wait(); }
// The end of this warp's turn: its lanes meet, lane 0 hands the turn to the next warp, and all wait for the next.
inline void end_turn(bool wait_again) {
  const unsigned w = thread_idx.x / 32;
  Warp& me = *(*block_warps)[w];
  me.lanes_meet.arrive_and_wait();
  if (thread_idx.x % 32 == 0) {
    Warp& next = *(*block_warps)[next_warp(w)];
    next.go.release(next.lanes);
  }
  if (wait_again) me.go.acquire();
}

// cp.async ordering, checked rather than assumed. A thread's copy is in flight from its issue to the wait_group that
// retires it, and visible to other threads only after the next __syncthreads(). Epochs number the kernel's own
// barriers, so "in flight" is a fact of program order, not of how the host threads happened to interleave: a read
// of a 16-byte unit (every ldmatrix row) in an epoch from the copy's issue to its wait, by any thread, is a race —
// either it reads the old contents while the copy may overwrite them (write after read: a barrier missing before a
// stage is refilled) or the new ones before they are guaranteed (read after write: a wait or a barrier missing).
inline thread_local int epoch = 0;  // __syncthreads() this thread has passed in this block
inline void barrier() {
  ++epoch;
  end_turn(true);
}
struct AsyncCopy {
  void* dst;
  const void* src;
  bool valid;
  int issued;  // epoch
};
struct Landed {
  uintptr_t unit;  // shared-memory address / 16
  int issued, waited;
};
struct SharedRead {
  uintptr_t unit;
  int epoch;
};
struct RaceLog {
  std::mutex m;
  std::vector<Landed> copies;
  std::vector<SharedRead> reads;
};
inline thread_local std::vector<AsyncCopy> async_open;
inline thread_local std::deque<std::vector<AsyncCopy>> async_groups;
inline RaceLog* block_races = nullptr;
// totals over launches: reads that raced a copy, threads that ended with copies never waited for
inline std::atomic<long> async_races{0}, async_unwaited{0};

inline long count_races(const RaceLog& log) {
  std::unordered_map<uintptr_t, std::vector<const Landed*>> by_unit;
  for (const auto& c : log.copies) by_unit[c.unit].push_back(&c);
  long races = 0;
  for (const auto& r : log.reads) {
    const auto it = by_unit.find(r.unit);
    if (it == by_unit.end()) continue;
    for (const Landed* c : it->second) races += c->issued <= r.epoch && r.epoch <= c->waited;
  }
  return races;
}

// Run kernel(args...) over grid x block (block.x threads; y = z = 1) with `smem` bytes of dynamic shared memory.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, Kernel kernel, Args... args) {
  std::vector<float> buf(smem / sizeof(float) + 4);
  block_dim = block, grid_dim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(buf.data(), 0xff, buf.size() * sizeof(float));  // NaN garbage: unstaged reads show up
        std::vector<std::unique_ptr<Warp>> warps;
        for (unsigned t = 0; t < block.x; t += 32) warps.push_back(std::make_unique<Warp>(std::min(32u, block.x - t)));
        Warp& first = *warps[schedule == Schedule::kAscending ? 0 : warps.size() - 1];
        first.go.release(first.lanes);
        std::vector<float> exchange(block.x);
        std::vector<const void*> addresses(block.x);
        std::vector<uint32_t> words(6 * block.x);
        block_warps = &warps;
        block_exchange = &exchange;
        block_addresses = &addresses;
        block_words = &words;
        block_smem = buf.data();
        RaceLog races;
        block_races = &races;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block.x; ++t)
          threads.emplace_back([&, t] {
            thread_idx = {t, 0, 0};
            block_idx = {bx, by, bz};
            (*block_warps)[t / 32]->go.acquire();
            kernel(args...);
            end_turn(false);
            bool pending = !async_open.empty();
            for (const auto& group : async_groups) pending |= !group.empty();
            async_unwaited += pending;
          });
        for (auto& th : threads) th.join();
        async_races += count_races(races);
      }
}
}  // namespace hcml_emu

#define threadIdx (hcml_emu::thread_idx)
#define blockIdx (hcml_emu::block_idx)
#define blockDim (hcml_emu::block_dim)
#define gridDim (hcml_emu::grid_dim)
#define __syncthreads() hcml_emu::barrier()

// A warp shuffle as the lanes of the warp exchanging through memory between two meetings of the lanes: valid
// where, as in these kernels, all lanes of a warp reach each shuffle together (full mask).
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

// ---------------------------------------------------------------- the tensor-core API the NHWC kernels use
// Warp collectives, emulated like the shuffle above (all lanes of the warp reach each call together), with
// PTX's fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16", "ldmatrix"): lane l = 4 g + q.

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8 j .. 8 j + 7 give the row addresses (16 bytes each) of
// matrix j; register j of lane l holds row g, columns 2 q and 2 q + 1 (low half first). With trans: the
// transposed matrix, i.e. rows 2 q and 2 q + 1 of column g.
template <bool Trans>
inline void ldmatrix_x4_emulated(uint32_t (&r)[4], const void* row) {
  auto& ex = *hcml_emu::block_addresses;
  const unsigned t = threadIdx.x, lane = t & 31u, base = t & ~31u, g = lane / 4, q = lane % 4;
  ex[t] = row;
  hcml_emu::sync();
  if (lane == 0) {
    std::lock_guard<std::mutex> lock(hcml_emu::block_races->m);
    for (int j = 0; j < 4; ++j) {
      unsigned groups = 0;
      for (unsigned r = 0; r < 8; ++r) {
        const uintptr_t unit = reinterpret_cast<uintptr_t>(ex[base + 8 * j + r]) / 16;
        groups |= 1u << (unit % 8);
        hcml_emu::block_races->reads.push_back({unit, hcml_emu::epoch});
      }
      ++hcml_emu::ldmatrix_phases;
      if (groups != 0xFFu) ++hcml_emu::ldmatrix_conflicted_phases;
    }
  }
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (!Trans) {
      const auto* p = static_cast<const uint16_t*>(ex[base + 8 * j + g]);
      lo = p[2 * q], hi = p[2 * q + 1];
    } else {
      lo = static_cast<const uint16_t*>(ex[base + 8 * j + 2 * q])[g];
      hi = static_cast<const uint16_t*>(ex[base + 8 * j + 2 * q + 1])[g];
    }
    r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  hcml_emu::sync();
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: D = A B + C with A 16 x 16 (a0: rows g, k
// 2q..2q+1; a1: rows g + 8; a2, a3: k + 8), B 16 x 8 (b0: k 2q..2q+1, column g; b1: k + 8), C 16 x 8 (c0, c1:
// row g, columns 2q, 2q + 1; c2, c3: row g + 8). Products are exact in fp32; sums in k order (the hardware's
// order differs: the tests allow for rounding).
template <typename E>
inline void mma_16816_emulated(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  auto& w = *hcml_emu::block_words;
  const unsigned t = threadIdx.x, lane = t & 31u, base = t & ~31u, g = lane / 4, q = lane % 4;
  for (int n = 0; n < 4; ++n) w[6 * t + n] = a[n];
  w[6 * t + 4] = b[0], w[6 * t + 5] = b[1];
  hcml_emu::sync();
  auto half = [&](unsigned l, int reg, int k) {
    const uint32_t word = w[6 * (base + l) + reg];
    E e;
    const uint16_t bits = static_cast<uint16_t>((k % 2) ? word >> 16 : word & 0xFFFFu);
    std::memcpy(&e, &bits, 2);
    if constexpr (std::is_same_v<E, __half>) return __half2float(e);
    else return __bfloat162float(e);
  };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * q + e % 2;
    float acc = 0.f;
    for (int k = 0; k < 16; ++k)
      acc += half((row % 8) * 4 + (k % 8) / 2, row / 8 + 2 * (k / 8), k) * half(col * 4 + (k % 8) / 2, 4 + k / 8, k);
    out[e] = acc;
  }
  hcml_emu::sync();
  for (int e = 0; e < 4; ++e) c[e] += out[e];
}

// cp.async.cg.shared.global (16 bytes, zero-filled when !valid), commit_group, wait_group N. The copies of a group
// land only when a wait_group retires it, so a kernel that reads a buffer before waiting for it reads the NaN
// garbage launch() filled shared memory with and fails its test; the race log above catches the reads that
// values cannot (another warp's, or the old contents of a stage being refilled).
inline void cp_async_16_emulated(void* dst, const void* src, bool valid) {
  hcml_emu::async_open.push_back({dst, src, valid, hcml_emu::epoch});
}
inline void cp_async_commit_emulated() {
  hcml_emu::async_groups.push_back(std::move(hcml_emu::async_open));
  hcml_emu::async_open.clear();
}
inline void cp_async_wait_emulated(int pending) {
  auto& groups = hcml_emu::async_groups;
  while (static_cast<int>(groups.size()) > pending) {
    std::lock_guard<std::mutex> lock(hcml_emu::block_races->m);
    for (const auto& c : groups.front()) {
      if (c.valid) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
      hcml_emu::block_races->copies.push_back({reinterpret_cast<uintptr_t>(c.dst) / 16, c.issued, hcml_emu::epoch});
    }
    groups.pop_front();
  }
}
