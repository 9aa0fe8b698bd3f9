/* Decoding's work on CPUs with AVX512-BF16, where torch's own leaves speed or exactness unused:
 * bfloat16 products of a few rows with a weight and attention of a few queries over a KV cache
 * (models of any size), and whole float32 blocks of small models.
 *
 * bf16_linear: y = x . w^T for x (M rows, M small) and w (N, K), accumulated in float32 and
 * rounded to bfloat16 as torch's F.linear rounds. A decoding step multiplies one row (or a
 * verification's few) by every weight of the model, so its time is the time to read the
 * weights. Each weight row is read once per call, six rows at a time against up to four x rows
 * (24 accumulators in registers), with VDPBF16PS fusing the bf16 products into float32 sums;
 * from about 8 rows the products are bound by that instruction's throughput, not by memory.
 *
 * f32_block: a float32 block in fastblock.FastBlock's folded layout, for a model whose step is
 * bound by the fixed cost of torch's calls (about 25 per block at a few microseconds each).
 * f32_exit_confidence: an early exit's logits and softmax confidence, DEE's check.
 * f32_decode: a whole step in one call (embedding, blocks, head; for DEE also the checks, the
 * exit and CALM propagation), since a call from Python costs about a third of a block.
 *
 * Every output is the same sequence of instructions whatever M is and whichever tile holds it,
 * and so is every attention row and every block row whatever T is: a row's result does not
 * depend on the other rows, so verifying k drafts in one call gives exactly the logits of k
 * one-row steps.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <omp.h>

/* float32 -> bfloat16, round to nearest even (torch's rounding); NaN stays a quiet NaN */
static inline uint16_t to_bf16(float value) {
  uint32_t bits;
  __builtin_memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

/* R weight rows (w, w + K, ...) against MR x rows (x, x + ldx, ...), into y[m * ldy + r]. */
static inline __attribute__((always_inline)) void tile(const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t K,
                                                       uint16_t *y, int64_t ldy, const int R, const int MR) {
  __m512 acc[4][6];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[6];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
    for (int m = 0; m < MR; ++m) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  if (k < K) { /* the last K % 32 columns, zero-padded by masked loads */
    __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    __m512bh wv[6];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * K + k);
    for (int m = 0; m < MR; ++m) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < R; ++r) y[m * ldy + r] = to_bf16(_mm512_reduce_add_ps(acc[m][r]));
}

/* Every x row against R = 6 weight rows (or R = 1 for the last N % 6), four x rows at a time. */
#define ROWS(R)                                                                              \
  static void rows##R(const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t K, uint16_t *y, \
                      int64_t ldy, int64_t M) {                                              \
    int64_t m = 0;                                                                           \
    for (; m + 4 <= M; m += 4) tile(x + m * ldx, ldx, w, K, y + m * ldy, ldy, R, 4);         \
    switch (M - m) {                                                                         \
      case 3: tile(x + m * ldx, ldx, w, K, y + m * ldy, ldy, R, 3); break;                   \
      case 2: tile(x + m * ldx, ldx, w, K, y + m * ldy, ldy, R, 2); break;                   \
      case 1: tile(x + m * ldx, ldx, w, K, y + m * ldy, ldy, R, 1); break;                   \
    }                                                                                        \
  }
ROWS(6)
ROWS(1)

/* y (M, N), rows ldy apart = x (M, K), rows ldx apart . w (N, K, contiguous)^T; threads share N. */
void bf16_linear(const uint16_t *x, int64_t ldx, const uint16_t *w, uint16_t *y, int64_t ldy, int64_t M, int64_t N,
                 int64_t K, int threads) {
  const int64_t blocks = N / 6;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t b = 0; b < blocks; ++b) rows6(x, ldx, w + b * 6 * K, K, y + b * 6, ldy, M);
  for (int64_t n = blocks * 6; n < N; ++n) rows1(x, ldx, w + n * K, K, y + n, ldy, M);
}

/* ---------------------------------------------------------------------------- attention */

/* 16 bfloat16 -> float32 (n < 16: the first n, zeros after) */
static inline __m512 load16(const uint16_t *p, int n) {
  __m256i bits = n >= 16 ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/* e^x within 2 ulp of float32's: 0 below -87, e^88 above 88 (softmax's x <= 0; SiLU's any x) */
static inline __m512 exp_ps(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* x - n ln2, in two parts */
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f); /* Cephes expf's polynomial on [-ln2/2, ln2/2] */
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps((__mmask16)~tiny, p, _mm512_castsi512_ps(scale));
}

/* The first min(left, 16) lanes */
static inline __mmask16 lanes16(int64_t left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }

/* sum of e^(x[j] - top) over j < n, in 16-lane float32 vectors; written back over x unless keep */
static float exp_sum(float *x, int64_t n, float top, int keep) {
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes16(n - j);
    const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), _mm512_set1_ps(top))));
    if (!keep) _mm512_mask_storeu_ps(x + j, m, e);
    total = _mm512_add_ps(total, e);
  }
  return _mm512_reduce_add_ps(total);
}

/* One query row (D values) over keys/values 0..n-1 (rows ks / vs apart): softmax(scale q.k) . v,
   all in float32, rounded to bfloat16 into out; scores: room for n floats. */
static void attend_row(const uint16_t *q, const uint16_t *k, int64_t ks, const uint16_t *v, int64_t vs, int64_t n,
                       int64_t D, float scale, float *scores, float *acc, uint16_t *out) {
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    __m512 dot = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      const __mmask32 m = D - d >= 32 ? (__mmask32)~0u : (__mmask32)((1u << (D - d)) - 1);
      dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_maskz_loadu_epi16(m, q + d),
                             (__m512bh)_mm512_maskz_loadu_epi16(m, k + j * ks + d));
    }
    scores[j] = scale * _mm512_reduce_add_ps(dot);
    top = scores[j] > top ? scores[j] : top;
  }
  const float norm = 1.0f / exp_sum(scores, n, top, 0);
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const __m512 p = _mm512_set1_ps(scores[j]);
    for (int64_t d = 0; d < D; d += 16) {
      const int left = D - d >= 16 ? 16 : (int)(D - d);
      _mm512_mask_storeu_ps(acc + d, lanes16(left),
                            _mm512_fmadd_ps(p, load16(v + j * vs + d, left), _mm512_maskz_loadu_ps(lanes16(left), acc + d)));
    }
  }
  for (int64_t d = 0; d < D; ++d) out[d] = to_bf16(acc[d] * norm);
}

/* Causal attention of T queries at the last T of S positions: q (B, H, T, D), k and v (B, Hkv, S, D),
   each with its own strides (elements; D's is 1); query head h reads key/value head h / (H / Hkv);
   query t sees keys 0 .. S - T + t. out: (B, T, H, D) contiguous; scratch: threads * (S + D) floats.
   Each (b, h, t) row is computed alone, by one thread, the same way whatever T: a row's bits do
   not depend on the other rows. */
void bf16_attention(const uint16_t *q, const int64_t *qs, const uint16_t *k, const int64_t *ks, const uint16_t *v,
                    const int64_t *vs, uint16_t *out, int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t S,
                    int64_t D, float scale, float *scratch, int threads) {
  const int64_t rows = B * H * T, groups = H / Hkv;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    float *scores = scratch + (int64_t)omp_get_thread_num() * (S + D);
    float *acc = scores + S;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t b = i / (H * T), h = (i / T) % H, t = i % T, kh = h / groups;
      attend_row(q + b * qs[0] + h * qs[1] + t * qs[2], k + b * ks[0] + kh * ks[1], ks[2], v + b * vs[0] + kh * vs[1],
                 vs[2], S - T + t + 1, D, scale, scores, acc, out + ((b * T + t) * H + h) * D);
    }
  }
}

/* ---------------------------------------------------------------------------- float32 blocks */

/* A float32 block in fastblock.FastBlock's folded layout, for one sequence: products are x @ W
   with W (in, out) row-major; norm gains and 1/sqrt(D) are folded into the weights. */
typedef struct {
  const float *qkv_rot; /* (C, (2H + 3Hkv) D): q | k | v | rotate_half(q) | rotate_half(k) */
  const float *out;     /* (H D, C) */
  const float *gate_up; /* (C, 2F) */
  const float *down;    /* (F, C) */
  int64_t C, H, Hkv, D, F;
  float eps;
} F32Block;

/* y[n .. n + 16 W) = x (K) . W (K, those columns; rows ldw apart), or += it: W accumulators of 16 columns each,
   every output summed over k in order */
#define F32_TILE(W_)                                                                                   \
  static inline __attribute__((always_inline)) void f32_tile##W_(const float *x, const float *W, int64_t ldw, \
                                                                int64_t K, float *y, int add) {        \
    __m512 a[W_];                                                                                      \
    for (int i = 0; i < W_; ++i) a[i] = _mm512_setzero_ps();                                           \
    for (int64_t k = 0; k < K; ++k) {                                                                  \
      const __m512 xv = _mm512_set1_ps(x[k]);                                                          \
      const float *w = W + k * ldw;                                                                    \
      for (int i = 0; i < W_; ++i) a[i] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + 16 * i), a[i]);     \
    }                                                                                                  \
    for (int i = 0; i < W_; ++i)                                                                       \
      _mm512_storeu_ps(y + 16 * i, add ? _mm512_add_ps(_mm512_loadu_ps(y + 16 * i), a[i]) : a[i]);    \
  }
F32_TILE(4)
F32_TILE(16)

/* y (N) = x (K) . W (K, N; rows ldw apart), or y += it; each output summed over k in order, whatever N,
   the tile or the thread; threads share the column tiles (more than one only for weights of megabytes).
   Wide weights (a head) go 256 columns at a time: longer runs of each row, fewer passes over x. */
static void f32_product(const float *x, const float *W, int64_t ldw, int64_t K, int64_t N, float *y, int add,
                        int threads) {
  const int64_t wide = N >= 1024 ? N / 256 : 0, narrow = (N - wide * 256) / 64, done = wide * 256 + narrow * 64;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t tile = 0; tile < wide + narrow; ++tile) {
    if (tile < wide) f32_tile16(x, W + tile * 256, ldw, K, y + tile * 256, add);
    else f32_tile4(x, W + wide * 256 + (tile - wide) * 64, ldw, K, y + wide * 256 + (tile - wide) * 64, add);
  }
  for (int64_t n = done; n < N; n += 16) {
    const __mmask16 m = lanes16(N - n);
    __m512 a = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) a = _mm512_fmadd_ps(_mm512_set1_ps(x[k]), _mm512_maskz_loadu_ps(m, W + k * ldw + n), a);
    if (add) a = _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + n), a);
    _mm512_mask_storeu_ps(y + n, m, a);
  }
}

/* out (C) = x (C) / sqrt(mean(x^2) + eps) */
static void f32_normalize(const float *x, int64_t C, float eps, float *out) {
  __m512 sq = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = lanes16(C - c);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + c);
    sq = _mm512_fmadd_ps(v, v, sq);
  }
  const float scale = 1.0f / sqrtf(_mm512_reduce_add_ps(sq) / (float)C + eps);
  for (int64_t c = 0; c < C; ++c) out[c] = x[c] * scale;
}

/* One query row (D floats, already scaled) over keys/values 0..n-1 (rows D apart): softmax(q.k) . v */
static void f32_attend_row(const float *q, const float *k, const float *v, int64_t n, int64_t D, float *scores,
                           float *y) {
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    __m512 dot = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = lanes16(D - d);
      dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), _mm512_maskz_loadu_ps(m, k + j * D + d), dot);
    }
    scores[j] = _mm512_reduce_add_ps(dot);
    top = scores[j] > top ? scores[j] : top;
  }
  const float norm = 1.0f / exp_sum(scores, n, top, 0);
  for (int64_t d = 0; d < D; ++d) y[d] = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const __m512 p = _mm512_set1_ps(scores[j]);
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = lanes16(D - d);
      _mm512_mask_storeu_ps(y + d, m, _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(m, v + j * D + d), _mm512_maskz_loadu_ps(m, y + d)));
    }
  }
  for (int64_t d = 0; d < D; ++d) y[d] *= norm;
}

/* The block's forward for T rows of one sequence at positions pos..pos+T-1, x (T, C) updated in
   place; cos, sin (T, D); k_cache, v_cache (Hkv, max_len, D), this block's, written at those
   positions; scratch: f32_block_scratch floats. Every row is computed the same way whatever T
   or the number of threads. */
int64_t f32_block_scratch(const F32Block *b, int64_t T, int64_t keys) {
  const int64_t P = (2 * b->H + 3 * b->Hkv) * b->D;
  return b->C + P + T * b->H * b->D + b->H * b->D + 2 * b->F + keys;
}

void f32_block(const F32Block *b, float *x, int64_t T, const float *cos, const float *sin, float *k_cache,
               float *v_cache, int64_t max_len, int64_t pos, float *scratch, int threads) {
  const int64_t C = b->C, H = b->H, Hkv = b->Hkv, D = b->D, F = b->F, rotating = H + Hkv;
  const int64_t P = (2 * H + 3 * Hkv) * D, groups = H / Hkv;
  float *h = scratch, *proj = h + C, *queries = proj + P, *y = queries + T * H * D, *gu = y + H * D,
        *scores = gu + 2 * F;
  for (int64_t t = 0; t < T; ++t) { /* projections, rotary, this row's keys and values into the cache */
    f32_normalize(x + t * C, C, b->eps, h);
    f32_product(h, b->qkv_rot, P, C, P, proj, 0, threads);
    const float *c = cos + t * D, *s = sin + t * D, *rot = proj + (rotating + Hkv) * D;
    for (int64_t head = 0; head < rotating; ++head) {
      float *dst = head < H ? queries + (t * H + head) * D : k_cache + ((head - H) * max_len + pos + t) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = proj[head * D + d] * c[d] + rot[head * D + d] * s[d];
    }
    for (int64_t kh = 0; kh < Hkv; ++kh)
      for (int64_t d = 0; d < D; ++d) v_cache[(kh * max_len + pos + t) * D + d] = proj[(rotating + kh) * D + d];
  }
  for (int64_t t = 0; t < T; ++t) { /* attention, then the MLP, each added to the row */
    for (int64_t head = 0; head < H; ++head) {
      const int64_t kh = head / groups;
      f32_attend_row(queries + (t * H + head) * D, k_cache + kh * max_len * D, v_cache + kh * max_len * D,
                     pos + t + 1, D, scores, y + head * D);
    }
    float *row = x + t * C;
    f32_product(y, b->out, C, H * D, C, row, 1, threads);
    f32_normalize(row, C, b->eps, h);
    f32_product(h, b->gate_up, 2 * F, C, 2 * F, gu, 0, threads);
    for (int64_t f = 0; f < F; f += 16) { /* SiLU(gate) * up, into gate's place */
      const __mmask16 m = lanes16(F - f);
      const __m512 g = _mm512_maskz_loadu_ps(m, gu + f);
      const __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      _mm512_mask_storeu_ps(gu + f, m, _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_maskz_loadu_ps(m, gu + F + f)));
    }
    f32_product(gu, b->down, C, F, C, row, 1, threads);
  }
}

/* ---------------------------------------------------------------------------- float32 exit checks */

/* An early exit's logits and confidence in one call: logits (N) = normalize(x (C)) . head (C, N)
   (the folded layout: the final norm's gain in the head), and the softmax of the logits' largest
   probability (margin = 0) or its largest minus its second largest (margin = 1). */
static float f32_exit_confidence(const float *x, int64_t C, float eps, const float *head, int64_t N,
                                 float *logits, int margin, float *normalized) {
  f32_normalize(x, C, eps, normalized);
  f32_product(normalized, head, N, C, N, logits, 0, 1);
  float top = -INFINITY, second = -INFINITY;
  for (int64_t n = 0; n < N; ++n) {
    if (logits[n] > top) {
      second = top;
      top = logits[n];
    } else if (logits[n] > second) {
      second = logits[n];
    }
  }
  const float sum = exp_sum(logits, N, top, 1); /* the logits stay: an exit returns them */
  return margin ? (1.0f - expf(second - top)) / sum : 1.0f / sum;
}

/* logits (T, N) = normalize(x (T, C)) . head (C, N), row by row (each row's bits whatever T):
   the final norm and LM head of the folded layout, whose gain is in the head */
void f32_unembed(const float *x, int64_t T, int64_t C, float eps, const float *head, int64_t N, float *logits,
                 float *normalized, int threads) {
  for (int64_t t = 0; t < T; ++t) {
    f32_normalize(x + t * C, C, eps, normalized);
    f32_product(normalized, head, N, C, N, logits + t * N, 0, threads);
  }
}

/* ---------------------------------------------------------------------------- float32 decoding steps */

/* A float32 model in the folded layout, for whole decoding steps in one call (f32_decode). */
typedef struct {
  const F32Block *blocks; /* (L) */
  int64_t L;
  const float *embedding; /* (V, C) */
  const float *cos, *sin; /* rotary tables (max_seq_len, D) */
  float eps;              /* the final norm's (its gain is folded into the heads) */
} F32Model;

/* Dynamic early exit for one row: after block l (1 <= l < L) whose thresholds[l - 1] is finite,
   the row's confidence is measured; the row exits there at confidence >= the threshold, with
   the logits of head (C, N) in logits (N). */
enum { MEASURE_SOFTMAX, MEASURE_MARGIN, MEASURE_SATURATION, MEASURE_CLASSIFIER };
typedef struct {
  const float *thresholds; /* (L - 1), +inf where unchecked */
  const float *head;
  int64_t N;
  int measure; /* softmax, margin: through the head (f32_exit_confidence); saturation: the cosine of
                  the block's output and input, clamped to [0, 1], the head read only at an exit;
                  classifier: CALM's learned exit classifier (F32Classifier), the head read at an exit */
  float *logits;
  const struct F32Classifier *classifier; /* measure classifier only, else NULL */
} F32Exits;

/* The learned exit classifier of layerskip.decoding.measures.ExitClassifier, per checked layer l:
   z (Nc + H) = normalize(x) . fused[l - 1] (C, Nc + H): its short head's Nc logits, then the first
   layer's hidden-state terms; a = z[Nc:] + b1 + cos(x, x_in) w_cos + top w_top, where top is the
   short head's largest softmax probability; with a hidden layer (mlp), y = relu(a) . w2 + b2, else
   (logistic regression, H = 1) y = a; the confidence is sigmoid(y). params[l - 1]: w_cos, w_top,
   b1, w2 (H each), b2. reuse: the short head is the exits' head, so an exit returns its logits. */
typedef struct F32Classifier {
  const float *const *fused;  /* (L - 1), NULL where no layer network */
  const float *const *params; /* (L - 1) */
  int64_t Nc, H;
  int mlp, reuse;
} F32Classifier;

/* torch's cosine_similarity of x and y (C): x.y / max(|x| |y|, 1e-8), not clamped */
static float cosine(const float *x, const float *y, int64_t C) {
  __m512 xy = _mm512_setzero_ps(), xx = _mm512_setzero_ps(), yy = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = lanes16(C - c);
    const __m512 a = _mm512_maskz_loadu_ps(m, x + c), b = _mm512_maskz_loadu_ps(m, y + c);
    xy = _mm512_fmadd_ps(a, b, xy);
    xx = _mm512_fmadd_ps(a, a, xx);
    yy = _mm512_fmadd_ps(b, b, yy);
  }
  const float norms = sqrtf(_mm512_reduce_add_ps(xx)) * sqrtf(_mm512_reduce_add_ps(yy));
  return _mm512_reduce_add_ps(xy) / (norms > 1e-8f ? norms : 1e-8f);
}

/* The cosine of a block's output x and input y, clamped to [0, 1]: the saturation measure */
static float saturation(const float *x, const float *y, int64_t C) {
  const float c = cosine(x, y, C);
  return c < 0.0f ? 0.0f : (c > 1.0f ? 1.0f : c);
}

/* The exit classifier's confidence after block `layer` + 1 (F32Classifier); z (Nc + H) keeps the
   short head's logits for an exit that reuses them. */
static float f32_classifier_confidence(const F32Classifier *k, int64_t layer, const float *x, const float *before,
                                       int64_t C, float eps, float *normalized, float *z) {
  const int64_t Nc = k->Nc, H = k->H, W = Nc + H;
  f32_normalize(x, C, eps, normalized);
  f32_product(normalized, k->fused[layer], W, C, W, z, 0, 1);
  float top = -INFINITY;
  for (int64_t n = 0; n < Nc; ++n) top = z[n] > top ? z[n] : top;
  const float largest = 1.0f / exp_sum(z, Nc, top, 1); /* z stays: an exit may return its logits */
  const float cos = cosine(x, before, C);
  const float *w_cos = k->params[layer], *w_top = w_cos + H, *b1 = w_top + H, *w2 = b1 + H, b2 = w2[H];
  float y = k->mlp ? b2 : 0.0f;
  for (int64_t h = 0; h < H; ++h) {
    const float a = z[Nc + h] + b1[h] + cos * w_cos[h] + largest * w_top[h];
    y += k->mlp ? (a > 0.0f ? a : 0.0f) * w2[h] : a;
  }
  return 1.0f / (1.0f + expf(-y));
}

/* CALM propagation: the keys and values of layers [first, L) for a row that exited with hidden
   state x at position pos, each layer reading x as its input (the columns of its qkv_rot that
   give keys, values and rotated keys: the same sums a block's projection makes of them). */
static void f32_propagate(const F32Model *m, const float *x, int64_t first, float *k_cache, float *v_cache,
                          int64_t max_len, int64_t pos, float *h, float *kv, int threads) {
  for (int64_t j = first; j < m->L; ++j) {
    const F32Block *b = m->blocks + j;
    const int64_t C = b->C, H = b->H, Hkv = b->Hkv, D = b->D, P = (2 * H + 3 * Hkv) * D;
    const float *c = m->cos + pos * D, *s = m->sin + pos * D;
    float *keys = k_cache + j * Hkv * max_len * D, *values = v_cache + j * Hkv * max_len * D;
    f32_normalize(x, C, b->eps, h);
    f32_product(h, b->qkv_rot + H * D, P, C, 2 * Hkv * D, kv, 0, threads);                  /* k | v */
    f32_product(h, b->qkv_rot + (2 * H + 2 * Hkv) * D, P, C, Hkv * D, kv + 2 * Hkv * D, 0, threads); /* rot k */
    for (int64_t kh = 0; kh < Hkv; ++kh)
      for (int64_t d = 0; d < D; ++d) {
        keys[(kh * max_len + pos) * D + d] = kv[kh * D + d] * c[d] + kv[(2 * Hkv + kh) * D + d] * s[d];
        values[(kh * max_len + pos) * D + d] = kv[(Hkv + kh) * D + d];
      }
  }
}

static double now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return 1e9 * (double)t.tv_sec + (double)t.tv_nsec;
}

/* Where f32_decode's time goes, when asked (phase_ns not NULL): nanoseconds added to phase_ns[phase] */
enum { PHASE_BLOCKS, PHASE_CHECKS, PHASE_PROPAGATION, PHASE_HEAD };

static inline double lap(double *phase_ns, int phase, double since) {
  if (phase_ns == NULL) return 0.0;
  const double t = now_ns();
  phase_ns[phase] += t - since;
  return t;
}

/* Blocks [start, end) on T rows of one sequence at positions pos..pos+T-1: x (T, C), updated in
   place, or first filled with the embeddings of tokens (T) when tokens is not NULL; keys and
   values into k_cache, v_cache (L, Hkv, max_len, D). With exits (one row, start = 0) the row may
   leave early (F32Exits), and then the layers it skipped get their keys and values by
   propagation. Then, if head is not NULL and the row did not exit, logits (N) =
   normalize(the last row) . head (C, N). Returns the number of blocks run up to the exit
   (end when none). -1: out of memory. phase_ns (4, or NULL): nanoseconds spent in the blocks,
   the checks, propagation and the head are added to it, for costs.py. */
int64_t f32_decode(const F32Model *m, int64_t start, int64_t end, const int64_t *tokens, float *x, int64_t T,
                   float *k_cache, float *v_cache, int64_t max_len, int64_t pos, const F32Exits *exits,
                   const float *head, int64_t N, float *logits, double *phase_ns, int threads) {
  const F32Block *first = m->blocks;
  const int64_t C = first->C, D = first->D, layer_size = first->Hkv * max_len * D;
  const int64_t P = (2 * first->H + 3 * first->Hkv) * D;
  const F32Classifier *classifier = exits != NULL && exits->measure == MEASURE_CLASSIFIER ? exits->classifier : NULL;
  const int64_t z_size = classifier != NULL ? classifier->Nc + classifier->H : 0;
  float *scratch = malloc(sizeof(float) * (f32_block_scratch(first, T, pos + T) + 2 * C + P + z_size));
  if (scratch == NULL) return -1;
  float *normalized = scratch + f32_block_scratch(first, T, pos + T), *kv = normalized + C, *before = kv + P;
  float *z = before + C;
  if (tokens != NULL)
    for (int64_t t = 0; t < T; ++t) memcpy(x + t * C, m->embedding + tokens[t] * C, sizeof(float) * C);
  int64_t ran = end;
  double t = phase_ns == NULL ? 0.0 : now_ns();
  for (int64_t layer = start; layer < end; ++layer) {
    const int64_t l = layer + 1;
    const int checked = exits != NULL && l < m->L && isfinite(exits->thresholds[layer]);
    const int reads_input = exits != NULL && (exits->measure == MEASURE_SATURATION || classifier != NULL);
    if (checked && reads_input) memcpy(before, x, sizeof(float) * C);
    f32_block(m->blocks + layer, x, T, m->cos + pos * D, m->sin + pos * D, k_cache + layer * layer_size,
              v_cache + layer * layer_size, max_len, pos, scratch, threads);
    t = lap(phase_ns, PHASE_BLOCKS, t);
    if (checked) {
      float confidence;
      if (classifier != NULL)
        confidence = f32_classifier_confidence(classifier, layer, x, before, C, m->eps, normalized, z);
      else if (exits->measure == MEASURE_SATURATION)
        confidence = saturation(x, before, C);
      else
        confidence = f32_exit_confidence(x, C, m->eps, exits->head, exits->N, exits->logits,
                                         exits->measure == MEASURE_MARGIN, normalized);
      t = lap(phase_ns, PHASE_CHECKS, t);
      if (confidence >= exits->thresholds[layer]) {
        if (classifier != NULL && classifier->reuse)
          memcpy(exits->logits, z, sizeof(float) * exits->N);
        else if (exits->measure == MEASURE_SATURATION || classifier != NULL)
          f32_unembed(x, 1, C, m->eps, exits->head, exits->N, exits->logits, normalized, threads);
        f32_propagate(m, x, l, k_cache, v_cache, max_len, pos, normalized, kv, threads);
        t = lap(phase_ns, PHASE_PROPAGATION, t);
        ran = l;
        break;
      }
    }
  }
  if (head != NULL && ran == end) {
    f32_unembed(x + (T - 1) * C, 1, C, m->eps, head, N, logits, normalized, threads);
    lap(phase_ns, PHASE_HEAD, t);
  }
  free(scratch);
  return ran;
}
