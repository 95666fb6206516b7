/* Where the one-pass least-squares product X^T (X v) loses to a plain dot-product pass when X
 * (here 4000 x 4000 float32, 64 MB) streams from L3: a stand-alone probe, outside the package,
 * that times variants of the fused row loop of csrc/cpu/simd.cpp (xtxv_rows) against a pass that
 * only takes the rows' dot products (what a gemv X v does), interleaved in rounds, 2 threads each
 * with half the rows. AVX-512 only.
 *
 *   gcc -O3 -march=native -fopenmp benchmarks/probes/xtxv_stream.c -o /tmp/xtxv_stream
 *   /tmp/xtxv_stream
 *
 * Variants (R rows per block; block k's update runs in the same column sweep as block k+1's dot
 * products, as in the package):
 *   r8      the package's loop (R = 8)
 *   r16     R = 16
 *   r4      R = 4
 *   r8-rev  R = 8, the update sweeps the columns backward (starts on the columns read last)
 *   r8-pf   R = 8, prefetcht0 of the rows being updated, 128 floats ahead
 *   r8-l1   diagnostic, not a product: r8 with the update reading a small L1-resident buffer
 *           instead of re-reading the rows (same arithmetic and streams otherwise)
 *   dots8   dot products only, 8 rows at a time (one pass, no update): the floor
 * Medians in ms, three rounds of 60, as printed by this file on 2026-11-27 on the 2-core Xeon dev
 * machine (AVX-512, 2 MiB L2 per core), loaded by other jobs:
 *   r8 1.614 / 1.588 / 1.578, r16 1.605 / 1.556 / 1.544, r4 1.699 / 1.645 / 1.619,
 *   r8-rev 1.616 / 1.576 / 1.546, r8-pf 1.624 / 1.577 / 1.555, r8-l1 1.428 / 1.406 / 1.390,
 *   dots8 1.377 / 1.361 / 1.361.
 * Every product variant costs 1.13-1.23x the dot-only pass; r8-l1, the same loop without the
 * re-read, 1.02-1.04x. The fused loop must re-read each block of rows after their dot products,
 * and at d = 4000 a block, v and the accumulator do not fit L1 together, so the re-read comes
 * from L2: twice the L1 misses of the dot-only pass per byte of X, and that is the difference.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define D 4000
#define N 4000

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* acc += sum_k t[k] X[k]; with next != NULL also tn[k] = next[k] . v in the same sweep. */
static float l1_rows[16 * 256];  /* r8-l1's stand-in for the re-read rows */

#define DEFINE_VARIANT(NAME, R, REVERSE_UPDATE, PREFETCH, L1_ONLY)                                        \
  static void update_##NAME(const float* X, const float* t, float* acc, const float* next,       \
                            const float* v, float* tn) {                                         \
    __m512 s[R];                                                                                 \
    for (int k = 0; k < R; k++) s[k] = _mm512_setzero_ps();                                      \
    for (int j = 0; j < D; j += 16) {                                                            \
      if (next) {                                                                                \
        const __m512 vj = _mm512_loadu_ps(v + j);                                                \
        for (int k = 0; k < R; k++)                                                              \
          s[k] = _mm512_fmadd_ps(_mm512_loadu_ps(next + k * D + j), vj, s[k]);                   \
      }                                                                                          \
      const int ju = REVERSE_UPDATE ? D - 16 - j : j;                                            \
      if (PREFETCH)                                                                              \
        for (int k = 0; k < R; k++) _mm_prefetch((const char*)(X + k * D + ju + 128), _MM_HINT_T0); \
      __m512 a = _mm512_loadu_ps(acc + ju);                                                      \
      for (int k = 0; k < R; k++)                                                                \
        a = _mm512_fmadd_ps(_mm512_set1_ps(t[k]),                                              \
                             _mm512_loadu_ps(L1_ONLY ? l1_rows + k * 256 + (ju & 255)          \
                                                     : X + k * D + ju),                        \
                             a);           \
      _mm512_storeu_ps(acc + ju, a);                                                             \
    }                                                                                            \
    if (next)                                                                                    \
      for (int k = 0; k < R; k++) tn[k] = _mm512_reduce_add_ps(s[k]);                            \
  }                                                                                              \
  static void xtxv_##NAME(const float* X, long r0, long r1, const float* v, float* acc) {        \
    static const float zero[R * D];                                                              \
    const long nb = (r1 - r0) / R;                                                               \
    float t[2][R] = {{0}};                                                                       \
    int cur = 0;                                                                                 \
    for (long k = 0; k <= nb; k++, cur ^= 1) {                                                   \
      const float* c = k > 0 ? X + (r0 + (k - 1) * R) * D : zero;                                \
      const float* nx = k < nb ? X + (r0 + k * R) * D : NULL;                                    \
      update_##NAME(c, t[cur], acc, nx, v, t[cur ^ 1]);                                          \
    }                                                                                            \
  }

DEFINE_VARIANT(r8, 8, 0, 0, 0)
DEFINE_VARIANT(r16, 16, 0, 0, 0)
DEFINE_VARIANT(r4, 4, 0, 0, 0)
DEFINE_VARIANT(r8rev, 8, 1, 0, 0)
DEFINE_VARIANT(r8pf, 8, 0, 1, 0)
DEFINE_VARIANT(r8l1, 8, 0, 0, 1)

static void dots8(const float* X, long r0, long r1, const float* v, float* out) {
  for (long i = r0; i + 8 <= r1; i += 8) {
    __m512 s[8];
    for (int k = 0; k < 8; k++) s[k] = _mm512_setzero_ps();
    for (int j = 0; j < D; j += 16) {
      const __m512 vj = _mm512_loadu_ps(v + j);
      for (int k = 0; k < 8; k++) s[k] = _mm512_fmadd_ps(_mm512_loadu_ps(X + (i + k) * D + j), vj, s[k]);
    }
    for (int k = 0; k < 8; k++) out[i + k] = _mm512_reduce_add_ps(s[k]);
  }
}

static int cmp(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

typedef void (*xtxv_fn)(const float*, long, long, const float*, float*);

int main(void) {
  float* X = aligned_alloc(64, (size_t)N * D * sizeof(float));
  static float v[D], acc[2][D], ref[D], out[N];
  for (long i = 0; i < (long)N * D; i++) X[i] = (float)((i * 7) % 13) * 0.01f;
  for (int j = 0; j < D; j++) v[j] = 0.001f * (j % 5);
  const xtxv_fn fns[] = {xtxv_r8, xtxv_r16, xtxv_r4, xtxv_r8rev, xtxv_r8pf, xtxv_r8l1};
  const char* names[] = {"r8", "r16", "r4", "r8-rev", "r8-pf", "r8-l1", "dots8"};
  enum { V = 7, ROUNDS = 60, DIAGNOSTIC = 5 };
  for (int q = 0; q < DIAGNOSTIC; q++) { /* every product variant gives the same product */
    memset(acc, 0, sizeof acc);
    fns[q](X, 0, N, v, acc[0]);
    if (q == 0) memcpy(ref, acc[0], sizeof ref);
    double e = 0, m = 0;
    for (int j = 0; j < D; j++) {
      const double dd = acc[0][j] > ref[j] ? acc[0][j] - ref[j] : ref[j] - acc[0][j];
      e = dd > e ? dd : e;
      m = ref[j] > m ? ref[j] : m;
    }
    if (e > 1e-5 * m) { fprintf(stderr, "%s differs from r8 by %g\n", names[q], e); return 1; }
  }
  for (int rep = 0; rep < 3; rep++) {
    static double ts[V][ROUNDS];
    for (int it = 0; it < ROUNDS; it++)
      for (int q = 0; q < V; q++) {
        const double t0 = now();
#pragma omp parallel num_threads(2)
        {
          const int t = omp_get_thread_num();
          if (q < V - 1) {
            memset(acc[t], 0, sizeof acc[t]);
            fns[q](X, N * t / 2, N * (t + 1) / 2, v, acc[t]);
          } else {
            dots8(X, N * t / 2, N * (t + 1) / 2, v, out);
          }
        }
        ts[q][it] = now() - t0;
      }
    for (int q = 0; q < V; q++) {
      qsort(ts[q], ROUNDS, sizeof(double), cmp);
      printf("%s %.3f  ", names[q], ts[q][ROUNDS / 2] * 1e3);
    }
    printf("(ms, medians)\n");
  }
  return 0;
}
