/* DPQ logits from codes: out[m, v] = sum_g T[g*K + codes[v, g], m].
 *
 * Compiled at first use by compemb.dpq.kernels (gcc -O3 -march=native -fopenmp) and
 * called through ctypes; the pure-PyTorch path in compemb.dpq.kernels computes the same
 * numbers and is used when this cannot be built.
 *
 * Layouts (all contiguous):
 *   T      float32 [D*K, M]: per-token partial dot products, row g*K + k holds the M
 *          tokens' products of group g's hidden sub-vector with value row k, so one code
 *          reads M neighbouring floats.
 *   codes  [ceil(V/16), D, 16] of uint8 / int16 (read as uint16) / int32: the codes of
 *          16 symbols side by side for each group ("blocked"), so a block of 16 symbols
 *          reads D*16 consecutive codes and keeps 16 independent sums per token.
 *   out    float32 [M, V].
 * Summation order per symbol: groups 0..D-1, one float32 accumulator per (symbol, token).
 * Blocks are handed out dynamically: on a shared machine a descheduled thread leaves its
 * share to the others instead of holding up the whole call.
 * One token (M == 1, a decode step at batch 1) on a CPU with AVX-512: uint8 codes take the
 * in-register path further down; wider ones gather a block's 16 codes of a group from T
 * with one 16-lane gather (same order of additions, so the same numbers;
 * 3.4 -> 2.8 ms at V=49152, D=144, K=256 on one thread of the development machine; the
 * in-register path below: 2.0 ms).
 * Blocks of 4 or 8 tokens keep the block's 16 x W sums in 16 vector registers (SSE /
 * AVX) instead of a stack array the compiler reloads for every code; same order of
 * additions. 8 tokens at V=49152, D=144: 17.6 -> 4.0 ms (one thread).
 */
#include <stdint.h>
#if defined(__SSE__) || defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLK 16

#ifdef __AVX512F__
#define LOAD_IDX_uint8_t(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define LOAD_IDX_uint16_t(p) _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p)))
#define LOAD_IDX_int32_t(p) _mm512_loadu_si512((const void *)(p))
#define DEFINE_ONE_TOKEN(NAME, CT)                                                         \
  static int NAME(const float *T, const CT *codes, float *out, long V, long D, long K,     \
                  int threads) {                                                           \
    long nblk = (V + BLK - 1) / BLK;                                                       \
    _Pragma("omp parallel for schedule(dynamic, 32) num_threads(threads) if(threads > 1)") \
    for (long b = 0; b < nblk; b++) {                                                      \
      const CT *c = codes + b * D * BLK;                                                   \
      __m512 acc = _mm512_setzero_ps();                                                    \
      for (long g = 0; g < D; g++)                                                         \
        acc = _mm512_add_ps(acc, _mm512_i32gather_ps(LOAD_IDX_##CT(c + g * BLK),          \
                                                     T + g * K, 4));                       \
      long v0 = b * BLK;                                                                   \
      if (V - v0 >= BLK) {                                                                 \
        _mm512_storeu_ps(out + v0, acc);                                                   \
      } else {                                                                             \
        float tmp[BLK];                                                                    \
        _mm512_storeu_ps(tmp, acc);                                                        \
        for (long j = 0; j < V - v0; j++) out[v0 + j] = tmp[j];                            \
      }                                                                                    \
    }                                                                                      \
    return 1;                                                                              \
  }
#else
#define DEFINE_ONE_TOKEN(NAME, CT)                                                         \
  static int NAME(const float *T, const CT *codes, float *out, long V, long D, long K,     \
                  int threads) {                                                           \
    (void)T; (void)codes; (void)out; (void)V; (void)D; (void)K; (void)threads;             \
    return 0;                                                                              \
  }
#endif

#define DEFINE_BLOCK(NAME, CT)                                                             \
  static inline __attribute__((always_inline)) void NAME(                                \
      const float *restrict T, const CT *restrict c, long D, long K, long M, long m0,      \
      const int W, float *restrict acc) {                                                  \
    for (int i = 0; i < BLK * W; i++) acc[i] = 0.f;                                        \
    for (long g = 0; g < D; g++) {                                                         \
      const float *restrict Tg = T + (g * K) * M + m0;                                     \
      const CT *restrict cg = c + g * BLK;                                                 \
      for (int j = 0; j < BLK; j++) {                                                      \
        const float *restrict row = Tg + (long)cg[j] * M;                                  \
        for (int w = 0; w < W; w++) acc[j * W + w] += row[w];                              \
      }                                                                                    \
    }                                                                                      \
  }

/* The block of DEFINE_BLOCK for one width W with the 16 sums in registers of type VT. */
#define DEFINE_BLOCK_VEC(NAME, CT, VT, W, ZERO, LOAD, ADD, STORE)                          \
  static inline __attribute__((always_inline)) void NAME(                                \
      const float *restrict T, const CT *restrict c, long D, long K, long M, long m0,      \
      float *restrict acc) {                                                               \
    VT a[BLK];                                                                             \
    for (int j = 0; j < BLK; j++) a[j] = ZERO();                                           \
    for (long g = 0; g < D; g++) {                                                         \
      const float *restrict Tg = T + (g * K) * M + m0;                                     \
      const CT *restrict cg = c + g * BLK;                                                 \
      _Pragma("GCC unroll 16")                                                             \
      for (int j = 0; j < BLK; j++) a[j] = ADD(a[j], LOAD(Tg + (long)cg[j] * M));          \
    }                                                                                      \
    for (int j = 0; j < BLK; j++) STORE(acc + j * W, a[j]);                                \
  }

#ifdef __SSE__
#define DEFINE_BLOCK4(NAME, CT) \
  DEFINE_BLOCK_VEC(NAME, CT, __m128, 4, _mm_setzero_ps, _mm_loadu_ps, _mm_add_ps, _mm_storeu_ps)
#define BLOCK4(NAME, T, c, D, K, M, m0, acc) NAME##_block4(T, c, D, K, M, m0, acc)
#else
#define DEFINE_BLOCK4(NAME, CT)
#define BLOCK4(NAME, T, c, D, K, M, m0, acc) NAME##_block(T, c, D, K, M, m0, 4, acc)
#endif
#ifdef __AVX__
#define DEFINE_BLOCK8(NAME, CT) \
  DEFINE_BLOCK_VEC(NAME, CT, __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_add_ps, \
                   _mm256_storeu_ps)
#define BLOCK8(NAME, T, c, D, K, M, m0, acc) NAME##_block8(T, c, D, K, M, m0, acc)
#else
#define DEFINE_BLOCK8(NAME, CT)
#define BLOCK8(NAME, T, c, D, K, M, m0, acc) NAME##_block(T, c, D, K, M, m0, 8, acc)
#endif

/* One token, uint8 codes (at most 256 codes per group; AVX-512): a group's K partial dot
 * products fit in R = 1, 2, 4, 8 or 16 vector registers, so a block's 16 codes are looked
 * up with in-register permutes (one per 32 codes, each over a pair of registers) joined by
 * blends on the code's bits 5, 6 and 7, instead of a gather from memory. The registers are
 * loaded once per 16 / R groups and a tile of blocks passes under them, its 16 sums per
 * block kept in a small array that stays in L1: reloading every group's products for
 * every block read 512 bytes a lookup at K = 128 (its 98 KB of products do not fit in
 * L1), which made the permutes no faster than the gather. Per symbol the groups are still
 * added one by one from 0 to D-1 into one float32 sum, the gather's order, so the same
 * numbers. One thread, V = 49152, codes in the cache: 128 codes in 192 groups
 * (compress_pretrained's DPQ at 10x with no user text) 3.1 ms by gathers -> 1.6 ms; 256
 * codes in 144 groups 2.8 -> 2.0 ms (python -m bench.dpq_kernel, "back to back"). */
#ifdef __AVX512F__
static inline __mmask16 compemb_lanes(long n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}
/* The lanes idx (below 128) of the products held in 8 registers t[0..7]. */
static inline __attribute__((always_inline)) __m512 compemb_pick128(const __m512 *t,
                                                                     __m512i idx) {
  const __m512i bit5 = _mm512_set1_epi32(32), bit6 = _mm512_set1_epi32(64);
  __mmask16 b5 = _mm512_test_epi32_mask(idx, bit5);
  __m512 lo = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(t[0], idx, t[1]),
                                   _mm512_permutex2var_ps(t[2], idx, t[3]));
  __m512 hi = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(t[4], idx, t[5]),
                                   _mm512_permutex2var_ps(t[6], idx, t[7]));
  return _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, bit6), lo, hi);
}
/* The lanes idx of a group's products held in R registers t[0..R-1] (16 floats each). */
static inline __attribute__((always_inline)) __m512 compemb_pick(const __m512 *t, __m512i idx,
                                                                  const int R) {
  if (R == 1) return _mm512_permutexvar_ps(idx, t[0]);
  __m512 v = _mm512_permutex2var_ps(t[0], idx, t[1]);
  if (R == 2) return v;
  if (R == 4)
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), v,
                                _mm512_permutex2var_ps(t[2], idx, t[3]));
  if (R == 8) return compemb_pick128(t, idx);
  return _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(128)),
                              compemb_pick128(t, idx), compemb_pick128(t + 8, idx));
}
#define TILE 64 /* blocks of 16 symbols per tile: 4 KB of sums */
#define DEFINE_SMALL_K(R)                                                                  \
  static void compemb_small_k_r##R(const float *T, const uint8_t *codes, float *out, long V, \
                                   long D, long K, int threads) {                          \
    enum { P = 16 / (R) }; /* groups whose products are held at once */                    \
    long nblk = (V + BLK - 1) / BLK, ntile = (nblk + TILE - 1) / TILE;                     \
    __mmask16 m[R];                                                                        \
    for (int r = 0; r < (R); r++) m[r] = compemb_lanes(K - 16 * r);                        \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1)")  \
    for (long tile = 0; tile < ntile; tile++) {                                            \
      float sums[TILE * BLK] __attribute__((aligned(64)));                                 \
      long b0 = tile * TILE, b1 = b0 + TILE < nblk ? b0 + TILE : nblk;                     \
      for (long g0 = 0; g0 < D; g0 += P) {                                                 \
        int np = (int)(D - g0 < P ? D - g0 : P);                                           \
        __m512 t[16];                                                                      \
        _Pragma("GCC unroll 16")                                                           \
        for (int i = 0; i < P * (R); i++)                                                  \
          t[i] = i / (R) < np ? _mm512_maskz_loadu_ps(m[i % (R)], T + (g0 + i / (R)) * K + \
                                                                     16 * (i % (R)))       \
                              : _mm512_setzero_ps();                                       \
        for (long b = b0; b < b1; b++) {                                                   \
          float *s = sums + (b - b0) * BLK;                                                \
          const uint8_t *c = codes + (b * D + g0) * BLK;                                   \
          __m512 acc = g0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(s);                  \
          _Pragma("GCC unroll 16")                                                         \
          for (int p = 0; p < P; p++) {                                                    \
            if (p >= np) break;                                                            \
            __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + p * BLK))); \
            acc = _mm512_add_ps(acc, compemb_pick(t + p * (R), idx, (R)));                 \
          }                                                                                \
          _mm512_store_ps(s, acc);                                                         \
        }                                                                                  \
      }                                                                                    \
      for (long b = b0; b < b1; b++) {                                                     \
        long v0 = b * BLK, n = V - v0 < BLK ? V - v0 : BLK;                                \
        for (long j = 0; j < n; j++) out[v0 + j] = sums[(b - b0) * BLK + j];               \
      }                                                                                    \
    }                                                                                      \
  }
DEFINE_SMALL_K(1)
DEFINE_SMALL_K(2)
DEFINE_SMALL_K(4)
DEFINE_SMALL_K(8)
DEFINE_SMALL_K(16)
static int compemb_dpq_logits_u8_small_k(const float *T, const uint8_t *codes, float *out,
                                         long V, long D, long K, int threads) {
  if (D <= 0) return 0; /* no group fills a tile's sums: the general path writes zeros */
  if (K <= 16) compemb_small_k_r1(T, codes, out, V, D, K, threads);
  else if (K <= 32) compemb_small_k_r2(T, codes, out, V, D, K, threads);
  else if (K <= 64) compemb_small_k_r4(T, codes, out, V, D, K, threads);
  else if (K <= 128) compemb_small_k_r8(T, codes, out, V, D, K, threads);
  else if (K <= 256) compemb_small_k_r16(T, codes, out, V, D, K, threads);
  else return 0;
  return 1;
}
#else
static int compemb_dpq_logits_u8_small_k(const float *T, const uint8_t *codes, float *out,
                                         long V, long D, long K, int threads) {
  (void)T; (void)codes; (void)out; (void)V; (void)D; (void)K; (void)threads;
  return 0;
}
#endif
#define compemb_dpq_logits_u16_small_k(T, codes, out, V, D, K, threads) 0
#define compemb_dpq_logits_i32_small_k(T, codes, out, V, D, K, threads) 0

#define DEFINE_KERNEL(NAME, CT)                                                            \
  DEFINE_BLOCK(NAME##_block, CT)                                                           \
  DEFINE_BLOCK4(NAME##_block4, CT)                                                         \
  DEFINE_BLOCK8(NAME##_block8, CT)                                                         \
  DEFINE_ONE_TOKEN(NAME##_one_token, CT)                                                   \
  void NAME(const float *T, const CT *codes, float *out, long V, long D, long K, long M,   \
            int threads) {                                                                 \
    if (M == 1 && NAME##_small_k(T, codes, out, V, D, K, threads)) return;                 \
    if (M == 1 && NAME##_one_token(T, codes, out, V, D, K, threads)) return;               \
    long nblk = (V + BLK - 1) / BLK;                                                       \
    _Pragma("omp parallel for schedule(dynamic, 32) num_threads(threads) if(threads > 1)") \
    for (long b = 0; b < nblk; b++) {                                                      \
      float acc[BLK * 16];                                                                 \
      const CT *c = codes + b * D * BLK;                                                   \
      long v0 = b * BLK;                                                                   \
      int n = (int)(V - v0 < BLK ? V - v0 : BLK);                                          \
      long m0 = 0;                                                                         \
      while (m0 < M) {                                                                     \
        long left = M - m0;                                                                \
        int W = left >= 16 ? 16 : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;      \
        switch (W) {                                                                       \
          case 16: NAME##_block(T, c, D, K, M, m0, 16, acc); break;                        \
          case 8: BLOCK8(NAME, T, c, D, K, M, m0, acc); break;                             \
          case 4: BLOCK4(NAME, T, c, D, K, M, m0, acc); break;                             \
          case 2: NAME##_block(T, c, D, K, M, m0, 2, acc); break;                          \
          default: NAME##_block(T, c, D, K, M, m0, 1, acc); break;                         \
        }                                                                                  \
        for (int w = 0; w < W; w++) {                                                      \
          float *o = out + (m0 + w) * V + v0;                                              \
          for (int j = 0; j < n; j++) o[j] = acc[j * W + w];                               \
        }                                                                                  \
        m0 += W;                                                                           \
      }                                                                                    \
    }                                                                                      \
  }

DEFINE_KERNEL(compemb_dpq_logits_u8, uint8_t)
DEFINE_KERNEL(compemb_dpq_logits_u16, uint16_t)
DEFINE_KERNEL(compemb_dpq_logits_i32, int32_t)

/* Dot products of float32 hidden states with int8 rows: out[m, n] = sum_j H[m, j] * R[n, j].
 * H float32 [M, d], R int8 [N, d], out float32 [M, N] (all contiguous). The rows are read
 * once for all M tokens (one row is d bytes, in L1 while the tokens pass over it), a
 * quarter of the bytes of the float rows, which are never built. Each sum runs over j in
 * an OpenMP SIMD reduction (vector lanes, then the lanes added), so its rounding differs
 * from a BLAS product's by float32 summation order only. */
#ifdef __AVX512F__
/* W tokens (a constant after inlining) against one int8 row: W vector sums over d in
 * steps of 16 (each 16 int8 widened once for all W), then each reduced, plus a scalar tail. */
static inline __attribute__((always_inline)) void compemb_int8_dots_w(
    const float *restrict H, const int8_t *restrict r, float *restrict out, long N, long n,
    long d, long m0, const int W) {
  __m512 acc[8];
  for (int w = 0; w < W; w++) acc[w] = _mm512_setzero_ps();
  long j = 0;
  for (; j + 16 <= d; j += 16) {
    __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(r + j))));
    for (int w = 0; w < W; w++)
      acc[w] = _mm512_fmadd_ps(_mm512_loadu_ps(H + (m0 + w) * d + j), b, acc[w]);
  }
  for (int w = 0; w < W; w++) {
    float tail = 0.f;
    for (long k = j; k < d; k++) tail += H[(m0 + w) * d + k] * (float)r[k];
    out[(m0 + w) * N + n] = _mm512_reduce_add_ps(acc[w]) + tail;
  }
}
#endif

/* Dot products of float32 hidden states with int8 rows: out[m, n] = sum_j H[m, j] * R[n, j].
 * H float32 [M, d], R int8 [N, d], out float32 [M, N] (all contiguous). The rows are read
 * once for all M tokens (one row is d bytes, in L1 while the tokens pass over it), a
 * quarter of the bytes of the float rows, which are never built. On AVX-512 up to 8 tokens
 * at a time keep their sums in vector registers and share each widened load of the row;
 * elsewhere each sum is an OpenMP SIMD reduction. Either way the rounding differs from a
 * BLAS product's by float32 summation order only. */
void compemb_int8_row_dots(const float *H, const int8_t *R, float *out, long N, long d,
                           long M, int threads) {
  _Pragma("omp parallel for schedule(dynamic, 64) num_threads(threads) if(threads > 1)")
  for (long n = 0; n < N; n++) {
    const int8_t *restrict r = R + n * d;
#ifdef __AVX512F__
    long m0 = 0;
    for (; m0 + 8 <= M; m0 += 8) compemb_int8_dots_w(H, r, out, N, n, d, m0, 8);
    for (; m0 + 4 <= M; m0 += 4) compemb_int8_dots_w(H, r, out, N, n, d, m0, 4);
    for (; m0 < M; m0 += 1) compemb_int8_dots_w(H, r, out, N, n, d, m0, 1);
#else
    for (long m = 0; m < M; m++) {
      const float *restrict h = H + m * d;
      float acc = 0.f;
      _Pragma("omp simd reduction(+:acc)")
      for (long j = 0; j < d; j++) acc += h[j] * (float)r[j];
      out[m * N + n] = acc;
    }
#endif
  }
}

int compemb_dpq_kernel_version(void) { return 9; }
