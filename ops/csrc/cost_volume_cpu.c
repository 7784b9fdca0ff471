/* Cost volume on the CPU: plain C over float32/float64 buffers in two layouts, so that neither of the model's
 * layouts is copied on the way in or out: NHWC (channels innermost: every dot product runs over contiguous
 * memory) for channels_last tensors, and planar (x innermost, NCHW-like with any n/c/y strides) for the rest,
 * where the inner loops run along image rows. The compiler vectorises both. No torch or Python headers:
 * hcml/ops/_cpu.py builds it with the system C compiler in about a second and calls it through ctypes; without
 * a compiler the op falls back to its pure-torch path.
 *
 * NHWC layouts (all contiguous): f1, f2 (N, H, W, C); out and grad (N, H, W, D*D); g1, g2 (N, H, W, C).
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

/* Planar kernels: each (n, c) image plane is contiguous (H*W, x innermost), planes anywhere (element (n, c, y, x)
 * of f1 at f1[n*st[0] + c*st[1] + y*W + x], f2 with st[2..3], grad (n, k, y, x) with st[4..5]); outputs are
 * contiguous (N, D*D, H, W) or (N, C, H, W). A displacement (dy, dx) is one flat offset dy*W + dx, so every inner
 * loop runs over a whole plane (vectorised, no per-row set-up); the positions whose x + dx left the row are the
 * ones it wraps into, and they get no contribution: the forward zeroes them at the end, the backward reads a copy
 * of grad with them zeroed (grad at a position outside the image is zero by definition). The flat range is
 * clipped so that no read leaves the plane. Sums run over c (forward) or the displacements (backward) in a fixed
 * order, with no reassociation across vector lanes: the results do not depend on the vector width or on how the
 * images are split over threads. */
#define MAX_(a, b) ((a) > (b) ? (a) : (b))
#define MIN_(a, b) ((a) < (b) ? (a) : (b))

/* [p0, p1): the flat positions p of a plane whose p + off stays in the plane and whose row y = p / W has
 * y + dy in the image. */
static void flat_range(long H, long W, long dy, long dx, long* p0, long* p1) {
  const long off = dy * W + dx;
  *p0 = MAX_(MAX_(0, -dy) * W, -off);
  *p1 = MIN_(MIN_(H, H - dy) * W, H * W - off);
}

#define DEFINE_PLANAR(T, SUFFIX)                                                                                   \
  void hcml_cv_forward_planar_##SUFFIX(const T* f1, const T* f2, T* out, const long* st, long H, long W, long C,  \
                                       long md, long s, long n0, long n1) {                                      \
    const long D = 2 * (md / s) + 1, HW = H * W;                                                                  \
    const T inv = (T)1 / (T)(C > 0 ? C : 1);                                                                      \
    for (long n = n0; n < n1; ++n)                                                                                \
      for (long k = 0; k < D * D; ++k) {                                                                          \
        const long dy = (k / D - D / 2) * s, dx = (k % D - D / 2) * s, off = dy * W + dx;                         \
        long p0, p1;                                                                                              \
        flat_range(H, W, dy, dx, &p0, &p1);                                                                       \
        T* restrict o = out + (n * D * D + k) * HW;                                                               \
        for (long p = 0; p < HW; ++p) o[p] = 0;                                                                   \
        for (long c = 0; c < C; ++c) {                                                                            \
          const T* restrict a = f1 + n * st[0] + c * st[1];                                                       \
          const T* restrict b = f2 + n * st[2] + c * st[3];                                                       \
          for (long p = p0; p < p1; ++p) o[p] += a[p] * b[p + off];                                               \
        }                                                                                                         \
        for (long y = 0; y < H; ++y) /* scale; zero what wrapped in from a neighbouring row */                   \
          for (long x = 0; x < W; ++x)                                                                            \
            o[y * W + x] = (x + dx >= 0 && x + dx < W) ? o[y * W + x] * inv : 0;                                  \
      }                                                                                                           \
  }                                                                                                               \
                                                                                                                  \
  /* g1[n, c, p] = 1/C sum_k g[n, k, p] * f2[n, c, p + off_k]                                                     \
   * g2[n, c, q] = 1/C sum_k g[n, k, q - off_k] * f1[n, c, q - off_k]  (gathered: no atomics)                     \
   * gm: scratch of D*D*H*W elements, grad / C with the positions outside the image zeroed. */                    \
  void hcml_cv_backward_planar_##SUFFIX(const T* g, const T* f1, const T* f2, T* g1, T* g2, T* gm,                \
                                        const long* st, long H, long W, long C, long md, long s, long n0,        \
                                        long n1) {                                                               \
    const long D = 2 * (md / s) + 1, HW = H * W;                                                                  \
    const T inv = (T)1 / (T)(C > 0 ? C : 1);                                                                      \
    for (long n = n0; n < n1; ++n) {                                                                              \
      for (long k = 0; k < D * D; ++k) {                                                                          \
        const long dy = (k / D - D / 2) * s, dx = (k % D - D / 2) * s;                                            \
        const T* gk = g + n * st[4] + k * st[5];                                                                  \
        for (long y = 0; y < H; ++y)                                                                              \
          for (long x = 0; x < W; ++x)                                                                            \
            gm[k * HW + y * W + x] =                                                                              \
                (y + dy >= 0 && y + dy < H && x + dx >= 0 && x + dx < W) ? gk[y * W + x] * inv : 0;               \
      }                                                                                                           \
      for (long c = 0; c < C; ++c) {                                                                              \
        const T* restrict a = f1 + n * st[0] + c * st[1];                                                         \
        const T* restrict b = f2 + n * st[2] + c * st[3];                                                         \
        T* restrict r1 = g1 + (n * C + c) * HW;                                                                   \
        T* restrict r2 = g2 + (n * C + c) * HW;                                                                   \
        for (long p = 0; p < HW; ++p) r1[p] = r2[p] = 0;                                                          \
        for (long k = 0; k < D * D; ++k) {                                                                        \
          const long dy = (k / D - D / 2) * s, dx = (k % D - D / 2) * s, off = dy * W + dx;                       \
          const T* restrict gk = gm + k * HW;                                                                     \
          long p0, p1;                                                                                            \
          flat_range(H, W, dy, dx, &p0, &p1);                                                                     \
          for (long p = p0; p < p1; ++p) r1[p] += gk[p] * b[p + off];                                             \
          for (long p = p0; p < p1; ++p) r2[p + off] += gk[p] * a[p];                                             \
        }                                                                                                         \
      }                                                                                                           \
    }                                                                                                             \
  }

DEFINE_PLANAR(float, f32)
DEFINE_PLANAR(double, f64)
