// Runs the NHWC cost-volume kernels on the CPU (emulation.h) and compares forward, dL/df1 and dL/df2 with a naive
// double-precision loop over the definition. Built and run by tests/test_cost_volume.py:
//   g++ -std=c++20 -O1 -pthread -DHCML_EMULATE test_nhwc_emulated.cpp && ./a.out   (exit 0: all cases pass)
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cost_volume_nhwc.cuh"

using namespace hcml;
using namespace hcml::nhwc;

template <typename T>
static double max_err(const std::vector<T>& got, const std::vector<double>& want, double* scale) {
  double e = 0, m = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    e = std::fmax(e, std::fabs(to_f(got[i]) - want[i]));
    m = std::fmax(m, std::fabs(want[i]));
  }
  *scale = m;
  return e;
}

template <typename T, int D, bool kVec>
static int run_case(const char* dtype, int B, int C, int H, int W, int s, unsigned seed, double rel_tol) {
  const int md = (D / 2) * s, DD = D * D;
  const Shape sh{B, C, H, W, md, s};
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  const size_t nf = static_cast<size_t>(B) * H * W * C, no = static_cast<size_t>(B) * H * W * DD;
  std::vector<T> f1(nf), f2(nf), g(no), out(no), g1(nf), g2(nf);
  for (auto& v : f1) v = from_f<T>(nd(rng));
  for (auto& v : f2) v = from_f<T>(nd(rng));
  for (auto& v : g) v = from_f<T>(nd(rng));
  const dim3 grid{static_cast<unsigned>((W + TW - 1) / TW), static_cast<unsigned>((H + TH - 1) / TH),
                  static_cast<unsigned>(B)};
  const dim3 block{THREADS, 1, 1};
  hcml_emu::launch(grid, block, smem_forward(sh), forward<T, D, kVec>, sh, f1.data(), f2.data(), out.data());
  hcml_emu::launch(grid, block, smem_backward(sh), backward<T, D, kVec, false>, sh, g.data(), f2.data(), g1.data());
  hcml_emu::launch(grid, block, smem_backward(sh), backward<T, D, kVec, true>, sh, g.data(), f1.data(), g2.data());

  // the definition, on the same (rounded) inputs, in double
  std::vector<double> ro(no, 0.0), r1(nf, 0.0), r2(nf, 0.0);
  auto px = [&](int b, int y, int x) { return (static_cast<size_t>(b) * H + y) * W + x; };
  for (int b = 0; b < B; ++b)
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < W; ++x)
        for (int i = 0; i < D; ++i)
          for (int j = 0; j < D; ++j) {
            const int yy = y + (i - D / 2) * s, xx = x + (j - D / 2) * s, k = i * D + j;
            if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
            const size_t p = px(b, y, x), q = px(b, yy, xx);
            double acc = 0;
            for (int c = 0; c < C; ++c) acc += double(to_f(f1[p * C + c])) * to_f(f2[q * C + c]);
            ro[p * DD + k] = acc / C;
            const double gk = to_f(g[p * DD + k]) / C;
            for (int c = 0; c < C; ++c) {
              r1[p * C + c] += gk * to_f(f2[q * C + c]);
              r2[q * C + c] += gk * to_f(f1[p * C + c]);
            }
          }
  int fails = 0;
  const char* names[3] = {"forward", "dL/df1", "dL/df2"};
  double scale[3], err[3] = {max_err(out, ro, &scale[0]), max_err(g1, r1, &scale[1]), max_err(g2, r2, &scale[2])};
  for (int t = 0; t < 3; ++t) {
    const bool ok = std::isfinite(err[t]) && err[t] <= rel_tol * (scale[t] + 1e-12);
    std::printf("%-5s D=%d s=%d vec=%d B=%d C=%d H=%d W=%d %-7s max err %.3g (scale %.3g) %s\n", dtype, D, s,
                int(kVec), B, C, H, W, names[t], err[t], scale[t], ok ? "ok" : "FAIL");
    fails += !ok;
  }
  return fails;
}

int main() {
  int fails = 0;
  // tiles cut by the image border in x (37 > 32) and y (13 > 8); several images
  fails += run_case<float, 7, false>("fp32", 2, 16, 13, 37, 2, 1, 1e-5);
  fails += run_case<float, 7, true>("fp32", 2, 16, 13, 37, 2, 2, 1e-5);
  // a channel tail: C = 12 is a multiple of the fp32 vector (4) but not of the chunk (8)
  fails += run_case<float, 5, true>("fp32", 1, 12, 9, 9, 1, 3, 1e-5);
  // C = 3: scalar loads only; D = 3
  fails += run_case<float, 3, false>("fp32", 1, 3, 5, 6, 2, 4, 1e-5);
  // a window larger than the image (md = 8 > H)
  fails += run_case<float, 9, false>("fp32", 1, 8, 5, 7, 2, 5, 1e-5);
  // half types: results rounded to 8 (bf16) / 11 (fp16) significant bits
  fails += run_case<__nv_bfloat16, 7, true>("bf16", 2, 16, 11, 35, 2, 6, 1e-2);
  fails += run_case<__half, 7, true>("fp16", 1, 24, 10, 33, 2, 7, 2e-3);
  fails += run_case<__nv_bfloat16, 7, false>("bf16", 1, 10, 9, 40, 2, 8, 1e-2);
  std::printf(fails ? "%d FAILED\n" : "all passed\n", fails);
  return fails ? 1 : 0;
}
