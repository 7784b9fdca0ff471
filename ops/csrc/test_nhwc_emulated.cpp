// Runs the NHWC cost-volume kernels on the CPU (emulation.h) and compares forward, dL/df1 and dL/df2 with a naive
// double-precision loop over the definition. Built and run by tests/test_cost_volume.py:
//   g++ -std=c++20 -O1 -pthread -DHCML_EMULATE test_nhwc_emulated.cpp && ./a.out   (exit 0: all cases pass)
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cost_volume_nhwc.cuh"

using namespace hcml;
using namespace hcml::nhwc;

template <typename T>
static double max_err(const std::vector<T>& got, const std::vector<double>& want, int C, int Cs, double* scale) {
  double e = 0, m = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (static_cast<int>(i % Cs) >= C) continue;  // padding channels: not part of the result
    const double d = std::fabs(to_f(got[i]) - want[i]);
    e = std::isfinite(d) ? std::fmax(e, d) : INFINITY;  // fmax would drop a NaN: an unwritten element must fail
    m = std::fmax(m, std::fabs(want[i]));
  }
  *scale = m;
  return e;
}

// kind 0: the compile-time (D, S) kernels; kind 1: the generic ones with run-time (D, s); kind 2: tensor cores.
template <typename T, int D, int S, int kind>
static int run_case(const char* dtype, int B, int C, int H, int W, unsigned seed, double rel_tol) {
  int conflicts = 0;
  constexpr int DD = D * D, V = Vec<T>::N;
  const int Cs = (C + V - 1) / V * V;
  const Shape sh{B, C, Cs, H, W};
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  const size_t nf = static_cast<size_t>(B) * H * W * Cs, no = static_cast<size_t>(B) * H * W * DD;
  std::vector<T> f1(nf), f2(nf), g(no), out(no, from_f<T>(NAN)), g1(nf, from_f<T>(NAN)), g2(nf, from_f<T>(NAN));
  for (size_t i = 0; i < nf; ++i) {  // padding channels are zeros, as ops/_cuda.py writes them
    const bool pad = static_cast<int>(i % Cs) >= C;
    f1[i] = from_f<T>(pad ? 0.f : nd(rng));
    f2[i] = from_f<T>(pad ? 0.f : nd(rng));
  }
  for (auto& v : g) v = from_f<T>(nd(rng));
  if constexpr (kind == 0) {
    using K = Fast<T, D, S>;
    const dim3 grid = tile_grid<K>(sh), block{K::THREADS, 1, 1}, block_bwd{K::THREADS_BWD, 1, 1};
    hcml_emu::launch(grid, block, K::SMEM_FWD, forward_fast<T, D, S>, sh, f1.data(), f2.data(), out.data());
    hcml_emu::launch(grid, block_bwd, K::SMEM_BWD, backward_fast<T, D, S>, sh, g.data(), f1.data(), f2.data(),
                     g1.data(), g2.data());
  } else if constexpr (kind == 2) {
    using K = Tc<T, D, S>;
    hcml_emu::ldmatrix_phases = 0, hcml_emu::ldmatrix_conflicted_phases = 0;
    hcml_emu::async_races = 0, hcml_emu::async_unwaited = 0;
    const dim3 grid = tile_grid<K>(sh), block{K::THREADS, 1, 1};
    hcml_emu::launch(grid, block, K::SMEM_FWD, forward_tc<T, D, S>, sh, f1.data(), f2.data(), out.data());
    hcml_emu::launch(grid, block, K::SMEM_BWD, backward_tc<T, D, S>, sh, g.data(), f1.data(), f2.data(), g1.data(),
                     g2.data());
    const long bad = hcml_emu::ldmatrix_conflicted_phases;  // the shared-memory layout's promise (Tc's comment)
    std::printf("%-5s tensor  ldmatrix phases %ld, with a bank conflict %ld %s\n", dtype,
                static_cast<long>(hcml_emu::ldmatrix_phases), bad, bad ? "FAIL" : "ok");
    conflicts += bad > 0;
    const long races = hcml_emu::async_races, unwaited = hcml_emu::async_unwaited;  // cp.async ordering
    std::printf("%-5s tensor  cp.async: reads racing a copy %ld, threads ending with copies in flight %ld %s\n", dtype,
                races, unwaited, races || unwaited ? "FAIL" : "ok");
    conflicts += races > 0 || unwaited > 0;
  } else {
    const dim3 block{GENERIC_THREADS, 1, 1};
    const int64_t nfw = static_cast<int64_t>(B) * H * W * DD, nbw = static_cast<int64_t>(B) * H * W * (Cs / V);
    // few blocks: the grid-stride loops are exercised too
    const dim3 gf{static_cast<unsigned>(std::min(generic_blocks(nfw), 3)), 1, 1};
    const dim3 gb{static_cast<unsigned>(std::min(generic_blocks(nbw), 2)), 1, 1};
    hcml_emu::launch(gf, block, 0, forward_generic<T>, sh, D, S, f1.data(), f2.data(), out.data());
    hcml_emu::launch(gb, block, 0, backward_generic<T>, sh, D, S, g.data(), f1.data(), f2.data(), g1.data(),
                     g2.data());
  }

  // the definition, on the same (rounded) inputs, in double
  std::vector<double> ro(no, 0.0), r1(nf, 0.0), r2(nf, 0.0);
  auto px = [&](int b, int y, int x) { return (static_cast<size_t>(b) * H + y) * W + x; };
  for (int b = 0; b < B; ++b)
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < W; ++x)
        for (int i = 0; i < D; ++i)
          for (int j = 0; j < D; ++j) {
            const int yy = y + (i - D / 2) * S, xx = x + (j - D / 2) * S, k = i * D + j;
            if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
            const size_t p = px(b, y, x), q = px(b, yy, xx);
            double acc = 0;
            for (int c = 0; c < C; ++c) acc += double(to_f(f1[p * Cs + c])) * to_f(f2[q * Cs + c]);
            ro[p * DD + k] = acc / C;
            const double gk = to_f(g[p * DD + k]) / C;
            for (int c = 0; c < C; ++c) {
              r1[p * Cs + c] += gk * to_f(f2[q * Cs + c]);
              r2[q * Cs + c] += gk * to_f(f1[p * Cs + c]);
            }
          }
  int fails = conflicts;
  const char* names[3] = {"forward", "dL/df1", "dL/df2"};
  double scale[3], err[3] = {max_err(out, ro, DD, DD, &scale[0]), max_err(g1, r1, C, Cs, &scale[1]),
                             max_err(g2, r2, C, Cs, &scale[2])};
  for (int t = 0; t < 3; ++t) {
    const bool ok = std::isfinite(err[t]) && err[t] <= rel_tol * (scale[t] + 1e-12);
    std::printf("%-5s %-7s D=%d s=%d B=%d C=%d H=%d W=%d %-7s max err %.3g (scale %.3g) %s\n", dtype,
                kind == 2 ? "tensor" : kind ? "generic" : "fast", D, S, B, C, H, W, names[t], err[t], scale[t], ok ? "ok" : "FAIL");
    fails += !ok;
  }
  return fails;
}

static bool stop_at_first_failure = false;  // `stop`: a mutant's verdict needs one failing case, not all

static int run_cases(const std::string& only) {
  int fails = 0;
  const bool fast = only.empty() || only == "fast", tensor = only.empty() || only == "tensor", all = only.empty();
  auto want = [&](bool family) { return family && !(stop_at_first_failure && fails); };
  // the models' (D, S) = (7, 2): tiles cut by the border in x (37 > 16) and y (13 > 8), two images, a channel
  // count that is not a multiple of the chunk (fp32: 12 = 1.5 chunks), an output row that does not start on a
  // 16-byte boundary (W * 49 odd)
  if (want(fast)) fails += run_case<float, 7, 2, 0>("fp32", 2, 12, 13, 37, 1, 1e-5);
  if (want(fast)) fails += run_case<__nv_bfloat16, 7, 2, 0>("bf16", 1, 24, 11, 35, 2, 1e-2);
  if (want(fast)) fails += run_case<__half, 7, 2, 0>("fp16", 1, 16, 9, 17, 3, 2e-3);
  // C = 3 padded to one vector; a window larger than the image (md = 6 > H = 5)
  if (want(fast)) fails += run_case<float, 7, 2, 0>("fp32", 1, 3, 5, 7, 4, 1e-5);
  // tensor cores (bf16, fp16): tiles cut by the border, C not a multiple of the 32- or 16-channel chunk (24 = 1.5
  // forward chunks; 40 = 2.5 backward chunks), an odd W, C below one chunk, a window larger than the image
  if (want(tensor)) fails += run_case<__nv_bfloat16, 7, 2, 2>("bf16", 2, 24, 11, 35, 9, 1e-2);
  if (want(tensor)) fails += run_case<__half, 7, 2, 2>("fp16", 1, 40, 9, 17, 10, 2e-3);
  if (want(tensor)) fails += run_case<__nv_bfloat16, 7, 2, 2>("bf16", 1, 8, 5, 7, 11, 1e-2);
  // generic: other (D, s), a channel tail padded with zeros, a window larger than the image
  if (want(all)) fails += run_case<float, 5, 1, 1>("fp32", 2, 6, 9, 10, 5, 1e-5);
  if (want(all)) fails += run_case<__nv_bfloat16, 3, 2, 1>("bf16", 1, 10, 7, 9, 6, 1e-2);
  if (want(all)) fails += run_case<float, 9, 2, 1>("fp32", 1, 8, 5, 7, 7, 1e-5);
  if (want(all)) fails += run_case<__half, 7, 2, 1>("fp16", 1, 8, 6, 11, 8, 2e-3);
  return fails;
}

int main(int argc, char** argv) {
  // `tensor` or `fast`: those kernels' cases only (what the mutation tests in tests/test_cost_volume.py rebuild)
  const std::string only = argc > 1 ? argv[1] : "";
  stop_at_first_failure = argc > 2 && std::string(argv[2]) == "stop";
  int fails = 0;
  // every case with the warps of a block taking turns in ascending, then descending order (emulation.h): a race
  // between two warps shows in one of the two
  for (const auto order : {hcml_emu::Schedule::kAscending, hcml_emu::Schedule::kDescending}) {
    hcml_emu::schedule = order;
    std::printf("-- warps in %s order\n", order == hcml_emu::Schedule::kAscending ? "ascending" : "descending");
    fails += run_cases(only);
    if (stop_at_first_failure && fails) break;
  }
  std::printf(fails ? "%d FAILED\n" : "all passed\n", fails);
  return fails ? 1 : 0;
}
