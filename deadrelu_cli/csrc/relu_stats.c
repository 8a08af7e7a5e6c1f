/* deadrelu: a float32 relu run and counted in one pass over memory (deadrelu_cli/native.py builds and loads it).

   y = relu(x) bit for bit as ATen's clamp_min(x, 0): x < 0 gives +0.0; -0.0 and NaN are kept. Per unit: the
   max of x, the count of x > 0 (a NaN does not count) and the sum of y. Separate ATen kernels need five
   passes per cache-sized slice for these (the max, the relu, the byte mask, its count, the sum); here the
   relu the model runs anyway does all of it, and the counting costs little more than the relu itself.

   Vectors are GCC vector extensions (16 floats: AVX-512, 2 x AVX2, 4 x SSE/NEON); on x86-64 GCC builds a
   clone per instruction set and picks one at load time, so the library runs on any x86-64 CPU. Threads:
   OpenMP, the runtime PyTorch has already loaded (libgomp.so.1). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef float hf __attribute__((vector_size(32)));
typedef double vd __attribute__((vector_size(64)));
#define W 16          /* floats per vector */
#define FLUSH 64      /* float partial sums are added into doubles every FLUSH vectors: few rounding steps */
#define ROW_BLOCK 64  /* [rows, units]: rows summed in registers before their column's totals */
#define MAX_THREADS 64

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

static inline __attribute__((always_inline)) vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline __attribute__((always_inline)) void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline __attribute__((always_inline)) vf select_(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline __attribute__((always_inline)) vf relu_(vf v) { return (vf)((vi)v & ~(vi)(v < 0.0f)); }
static inline __attribute__((always_inline)) void widen_add(vd *lo, vd *hi, vf s) {
  hf a, b;
  memcpy(&a, &s, sizeof a);
  memcpy(&b, (char *)&s + sizeof a, sizeof b);
  *lo += __builtin_convertvector(a, vd);
  *hi += __builtin_convertvector(b, vd);
}

/* [N, C, L] as N*C rows of L: row k is unit k % C. */
CLONES static void tail_rows(const float *x, float *y, int64_t k0, int64_t k1, int64_t C, int64_t L,
                             float *mx, int64_t *cnt, double *sum) {
  for (int64_t k = k0; k < k1; k++) {
    const float *xr = x + k * L;
    float *yr = y + k * L;
    vf m = (vf){} - INFINITY, s = (vf){};
    vi c = (vi){};
    vd slo = (vd){}, shi = (vd){};
    int64_t i = 0;
    int n = 0;
    for (; i + W <= L; i += W) {
      vf v = load(xr + i);
      m = select_((vi)(v > m), v, m);
      c -= (vi)(v > 0.0f);
      vf r = relu_(v);
      store(yr + i, r);
      s += r;
      if (++n == FLUSH) { widen_add(&slo, &shi, s); s = (vf){}; n = 0; }
    }
    widen_add(&slo, &shi, s);
    float mm = -INFINITY;
    int64_t cc = 0;
    double ss = 0.0;
    for (; i < L; i++) {
      float v = xr[i];
      mm = v > mm ? v : mm;
      cc += v > 0.0f;
      float r = v < 0.0f ? 0.0f : v;
      yr[i] = r;
      ss += r;
    }
    for (int j = 0; j < W; j++) { mm = m[j] > mm ? m[j] : mm; cc += c[j]; }
    for (int j = 0; j < W / 2; j++) ss += slo[j] + shi[j];
    int64_t u = k % C;
    mx[u] = mm > mx[u] ? mm : mx[u];
    cnt[u] += cc;
    sum[u] += ss;
  }
}

/* [R, U], units last (or [N, C*L] of short rows, column u of unit u / L): rows r0..r1, streamed in order.
   Each column's running max, count and float sum stay in small arrays (in L1/L2 for up to a few thousand
   columns); every ROW_BLOCK rows the float sums and counts are added into doubles / int64. */
CLONES static void unit_columns(const float *x, float *y, int64_t r0, int64_t r1, int64_t U, float *mx,
                                int64_t *cnt, double *sum, float *s, int32_t *c) {
  for (int64_t b = r0; b < r1; b += ROW_BLOCK) {
    int64_t e = b + ROW_BLOCK < r1 ? b + ROW_BLOCK : r1;
    memset(s, 0, (size_t)U * sizeof *s);
    memset(c, 0, (size_t)U * sizeof *c);
    int64_t r = b;
    for (; r + 4 <= e; r += 4) { /* four rows per load of the column's running results */
      const float *x0 = x + r * U;
      float *y0 = y + r * U;
      int64_t u = 0;
      for (; u + W <= U; u += W) {
        vf m = load(mx + u), sv = load(s + u);
        vi cv;
        memcpy(&cv, c + u, sizeof cv);
        for (int q = 0; q < 4; q++) {
          vf v = load(x0 + q * U + u);
          m = select_((vi)(v > m), v, m);
          cv -= (vi)(v > 0.0f);
          vf o = relu_(v);
          store(y0 + q * U + u, o);
          sv += o;
        }
        store(mx + u, m);
        store(s + u, sv);
        memcpy(c + u, &cv, sizeof cv);
      }
      for (; u < U; u++)
        for (int q = 0; q < 4; q++) {
          float v = x0[q * U + u];
          mx[u] = v > mx[u] ? v : mx[u];
          c[u] += v > 0.0f;
          float o = v < 0.0f ? 0.0f : v;
          y0[q * U + u] = o;
          s[u] += o;
        }
    }
    for (; r < e; r++) {
      const float *xr = x + r * U;
      float *yr = y + r * U;
      int64_t u = 0;
      for (; u + W <= U; u += W) {
        vf v = load(xr + u), m = load(mx + u);
        store(mx + u, select_((vi)(v > m), v, m));
        vi cv;
        memcpy(&cv, c + u, sizeof cv);
        cv -= (vi)(v > 0.0f);
        memcpy(c + u, &cv, sizeof cv);
        vf q = relu_(v);
        store(yr + u, q);
        store(s + u, load(s + u) + q);
      }
      for (; u < U; u++) {
        float v = xr[u];
        mx[u] = v > mx[u] ? v : mx[u];
        c[u] += v > 0.0f;
        float q = v < 0.0f ? 0.0f : v;
        yr[u] = q;
        s[u] += q;
      }
    }
    for (int64_t u = 0; u < U; u++) { cnt[u] += c[u]; sum[u] += s[u]; }
  }
}

typedef struct {
  int columns;
  const float *x;
  float *y;
  int64_t k0, k1, C, L, width;
  float *mx, *s;
  int64_t *cnt;
  double *sum;
  int32_t *c;
} job_t;

static void run_job(job_t *j) {
  if (j->columns) unit_columns(j->x, j->y, j->k0, j->k1, j->width, j->mx, j->cnt, j->sum, j->s, j->c);
  else tail_rows(j->x, j->y, j->k0, j->k1, j->C, j->L, j->mx, j->cnt, j->sum);
}

/* One batch of a relu site, x as [outer, C, L] (units last: L = 1); y may be x (in place).
   columns: the batch is read as [outer, C*L] (units last, or short rows), else as outer*C rows of L.
   The batch's max, count and sum per unit go into max_acc (NaN where the batch had a NaN, as a float max
   would have it), cnt_acc and sum_acc. scratch: deadrelu_scratch_bytes(C, L, columns, threads) bytes,
   8-byte aligned. */
void deadrelu_relu_stats(const float *x, float *y, int64_t outer, int64_t C, int64_t L, int columns,
                        int threads, void *scratch, double *max_acc, int64_t *cnt_acc, double *sum_acc) {
  int64_t total = columns ? outer : outer * C;
  int64_t width = columns ? C * L : C; /* per-thread partial results */
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (threads > total) threads = (int)total;
  if (threads < 1) threads = 1;
  job_t jobs[MAX_THREADS];
  char *at = scratch; /* each array for every thread in turn, the widest type first: all aligned */
#define TAKE(type) ((type *)(at += (size_t)threads * width * sizeof(type)) - (size_t)threads * width)
  double *sums = TAKE(double);
  int64_t *cnts = TAKE(int64_t);
  float *maxs = TAKE(float), *partial = columns ? TAKE(float) : NULL;
  int32_t *counts = columns ? TAKE(int32_t) : NULL;
#undef TAKE
  for (int t = 0; t < threads; t++) {
    job_t *j = &jobs[t];
    size_t at_t = (size_t)t * width;
    j->columns = columns; j->x = x; j->y = y; j->C = C; j->L = L; j->width = width;
    j->k0 = total * t / threads; j->k1 = total * (t + 1) / threads;
    j->sum = sums + at_t; j->cnt = cnts + at_t; j->mx = maxs + at_t;
    j->s = columns ? partial + at_t : NULL;
    j->c = columns ? counts + at_t : NULL;
    for (int64_t u = 0; u < width; u++) { j->mx[u] = -INFINITY; j->cnt[u] = 0; j->sum[u] = 0.0; }
  }
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; t++) run_job(&jobs[t]);
  int64_t span = columns ? L : 1;
  for (int64_t u = 0; u < C; u++) {
    double m = -INFINITY, s = 0.0;
    int64_t n = 0;
    for (int t = 0; t < threads; t++)
      for (int64_t k = u * span; k < (u + 1) * span; k++) {
        m = jobs[t].mx[k] > m ? jobs[t].mx[k] : m;
        n += jobs[t].cnt[k];
        s += jobs[t].sum[k];
      }
    if (isnan(s)) m = NAN; /* relu keeps a NaN, so its unit's sum is NaN; a float max would be NaN */
    if (isnan(m) || m > max_acc[u]) max_acc[u] = m;
    cnt_acc[u] += n;
    sum_acc[u] += s;
  }
}

/* The scratch deadrelu_relu_stats needs (the caller keeps it, so no call allocates). */
int64_t deadrelu_scratch_bytes(int64_t C, int64_t L, int columns, int threads) {
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (threads < 1) threads = 1;
  int64_t width = columns ? C * L : C;
  int64_t per = sizeof(float) + sizeof(int64_t) + sizeof(double) + (columns ? sizeof(float) + sizeof(int32_t) : 0);
  return threads * width * per;
}
