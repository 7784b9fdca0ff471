/* Cost volume on the CPU: plain C over NHWC float32/float64 buffers (channels innermost, so every dot product
 * runs over contiguous memory and the compiler vectorises it). No torch or Python headers: hcml/ops/_cpu.py
 * builds it with the system C compiler in about a second and calls it through ctypes; without a compiler the op
 * falls back to its pure-torch path.
 *
 * Layouts (all contiguous): f1, f2 (N, H, W, C); out and grad (N, H, W, D*D); g1, g2 (N, H, W, C).
 * out[n, y, x, i*D + j] = 1/C * sum_c f1[n, y, x, c] * f2[n, y + dy_i, x + dx_j, c], zero outside the image.
 * The backward writes every element of g1 and g2 exactly once (g2 gathers from the pixels it was read by), so
 * images run in parallel with no atomics; [n0, n1) selects the images one call computes.
 */
#include <stddef.h>

#define DEFINE_KERNELS(T, SUFFIX)                                                                                  \
  /* out[p, :] for pixel p = (n, y, x) */                                                                         \
  static void forward_pixel_##SUFFIX(const T* f1, const T* f2, T* out, const T* unused, T* unused2, long n,      \
                                     long y, long x, long H, long W, long C, long D, long s, T inv) {            \
    const T* a = f1 + ((n * H + y) * W + x) * C;                                                                  \
    T* o = out + ((n * H + y) * W + x) * D * D;                                                                   \
    (void)unused;                                                                                                \
    (void)unused2;                                                                                               \
    for (long i = 0; i < D; ++i) {                                                                                \
      const long yy = y + (i - D / 2) * s;                                                                        \
      for (long j = 0; j < D; ++j) {                                                                              \
        const long xx = x + (j - D / 2) * s;                                                                      \
        T acc = 0;                                                                                                \
        if (yy >= 0 && yy < H && xx >= 0 && xx < W) {                                                             \
          const T* b = f2 + ((n * H + yy) * W + xx) * C;                                                          \
          for (long c = 0; c < C; ++c) acc += a[c] * b[c];                                                        \
        }                                                                                                         \
        o[i * D + j] = acc * inv;                                                                                 \
      }                                                                                                           \
    }                                                                                                             \
  }                                                                                                               \
                                                                                                                  \
  /* g1[p, :] and g2[p, :] for pixel p */                                                                         \
  static void backward_pixel_##SUFFIX(const T* f1, const T* f2, T* g1, const T* g, T* g2, long n, long y, long x, \
                                      long H, long W, long C, long D, long s, T inv) {                           \
    const long p = (n * H + y) * W + x, DD = D * D;                                                               \
    T* r1 = g1 + p * C;                                                                                           \
    T* r2 = g2 + p * C;                                                                                           \
    for (long c = 0; c < C; ++c) r1[c] = r2[c] = 0;                                                               \
    for (long i = 0; i < D; ++i) {                                                                                \
      const long dy = (i - D / 2) * s;                                                                            \
      for (long j = 0; j < D; ++j) {                                                                              \
        const long dx = (j - D / 2) * s, k = i * D + j;                                                           \
        /* dL/df1[p] += g[p, k] * f2[p + d_k] */                                                                  \
        if (y + dy >= 0 && y + dy < H && x + dx >= 0 && x + dx < W) {                                             \
          const T gk = g[p * DD + k] * inv;                                                                       \
          const T* b = f2 + ((n * H + y + dy) * W + x + dx) * C;                                                  \
          for (long c = 0; c < C; ++c) r1[c] += gk * b[c];                                                        \
        }                                                                                                         \
        /* dL/df2[p] += g[p - d_k, k] * f1[p - d_k] */                                                            \
        if (y - dy >= 0 && y - dy < H && x - dx >= 0 && x - dx < W) {                                             \
          const long q = (n * H + y - dy) * W + x - dx;                                                           \
          const T gk = g[q * DD + k] * inv;                                                                       \
          const T* a = f1 + q * C;                                                                                \
          for (long c = 0; c < C; ++c) r2[c] += gk * a[c];                                                        \
        }                                                                                                         \
      }                                                                                                           \
    }                                                                                                             \
  }                                                                                                               \
                                                                                                                  \
  typedef void (*pixel_fn_##SUFFIX)(const T*, const T*, T*, const T*, T*, long, long, long, long, long, long,     \
                                    long, long, T);                                                               \
  static void each_pixel_##SUFFIX(pixel_fn_##SUFFIX fn, const T* f1, const T* f2, T* o1, const T* g, T* o2,     \
                                  long H, long W, long C, long md, long s, long n0, long n1) {                   \
    const long D = 2 * (md / s) + 1;                                                                              \
    const T inv = (T)1 / (T)(C > 0 ? C : 1);                                                                      \
    for (long n = n0; n < n1; ++n)                                                                                \
      for (long y = 0; y < H; ++y)                                                                                \
        for (long x = 0; x < W; ++x) fn(f1, f2, o1, g, o2, n, y, x, H, W, C, D, s, inv);                          \
  }                                                                                                               \
                                                                                                                  \
  void hcml_cv_forward_##SUFFIX(const T* f1, const T* f2, T* out, long N, long H, long W, long C, long md,        \
                                long s, long n0, long n1) {                                                      \
    (void)N;                                                                                                     \
    each_pixel_##SUFFIX(forward_pixel_##SUFFIX, f1, f2, out, NULL, NULL, H, W, C, md, s, n0, n1);                 \
  }                                                                                                               \
                                                                                                                  \
  void hcml_cv_backward_##SUFFIX(const T* g, const T* f1, const T* f2, T* g1, T* g2, long N, long H, long W,       \
                                 long C, long md, long s, long n0, long n1) {                                     \
    (void)N;                                                                                                     \
    each_pixel_##SUFFIX(backward_pixel_##SUFFIX, f1, f2, g1, g, g2, H, W, C, md, s, n0, n1);                      \
  }

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)
