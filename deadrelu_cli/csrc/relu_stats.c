/* deadrelu: a float32 relu or relu6 run and counted in one pass over memory (deadrelu_cli/native.py builds
   and loads it).

   y = relu(x) bit for bit as ATen's clamp_min(x, 0) (relu6: hardtanh(x, 0, 6)): x < 0 gives +0.0, x > cap
   gives cap; -0.0 and NaN are kept. Per unit: the max of x, the count of x > 0 (a NaN does not count), the
   sum of y, and for relu6 the count of x >= cap (y at the cap). Separate ATen kernels need five passes per
   cache-sized slice for these (the max, the relu, the byte mask, its count, the sum); here the relu the
   model runs anyway does all of it, and the counting costs little more than the relu itself.

   Vectors are GCC vector extensions (16 floats: AVX-512, 2 x AVX2, 4 x SSE/NEON); on x86-64 GCC builds a
   clone per instruction set and picks one at load time, so the library runs on any x86-64 CPU. Threads:
   OpenMP, the runtime PyTorch has already loaded (libgomp.so.1); each thread has its own rows and its own
   partial results, merged once per call in a fixed order: the same numbers for any timing. */
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
#define ROW_BLOCK 64  /* [rows, units]: rows summed in floats before their column's double totals */
#define MAX_THREADS 64
#define AI static inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

AI vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
AI void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
AI vi load_i(const int32_t *p) { vi v; memcpy(&v, p, sizeof v); return v; }
AI void store_i(int32_t *p, vi v) { memcpy(p, &v, sizeof v); }
AI vf select_(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
AI vf act(vf v, int capped, vf cap) {
  vf r = (vf)((vi)v & ~(vi)(v < 0.0f)); /* x < 0: +0.0; -0.0 and NaN as they are */
  return capped ? select_((vi)(v > cap), cap, r) : r;
}
AI float act1(float v, int capped, float cap) {
  float r = v < 0.0f ? 0.0f : v;
  return capped && v > cap ? cap : r;
}
AI void widen_add(vd *lo, vd *hi, vf s) {
  hf a, b;
  memcpy(&a, &s, sizeof a);
  memcpy(&b, (char *)&s + sizeof a, sizeof b);
  *lo += __builtin_convertvector(a, vd);
  *hi += __builtin_convertvector(b, vd);
}

/* [N, C, L] as N*C rows of L: row k is unit k % C. */
AI void tail_rows(const float *x, float *y, int64_t k0, int64_t k1, int64_t C, int64_t L, int capped, float cap,
                  float *mx, int64_t *cnt, double *sum, int64_t *sat) {
  const vf capv = (vf){} + cap;
  for (int64_t k = k0; k < k1; k++) {
    const float *xr = x + k * L;
    float *yr = y ? y + k * L : NULL;
    vf m = (vf){} - INFINITY, s = (vf){};
    vi c = (vi){}, cs = (vi){};
    vd slo = (vd){}, shi = (vd){};
    int64_t i = 0;
    int n = 0;
    for (; i + W <= L; i += W) {
      vf v = load(xr + i);
      m = select_((vi)(v > m), v, m);
      c -= (vi)(v > 0.0f);
      if (capped) cs -= (vi)(v >= capv);
      vf r = act(v, capped, capv);
      if (yr) store(yr + i, r);
      s += r;
      if (++n == FLUSH) { widen_add(&slo, &shi, s); s = (vf){}; n = 0; }
    }
    widen_add(&slo, &shi, s);
    float mm = -INFINITY;
    int64_t cc = 0, cc6 = 0;
    double ss = 0.0;
    for (; i < L; i++) {
      float v = xr[i];
      mm = v > mm ? v : mm;
      cc += v > 0.0f;
      cc6 += capped && v >= cap;
      float r = act1(v, capped, cap);
      if (yr) yr[i] = r;
      ss += r;
    }
    for (int j = 0; j < W; j++) { mm = m[j] > mm ? m[j] : mm; cc += c[j]; cc6 += cs[j]; }
    for (int j = 0; j < W / 2; j++) ss += slo[j] + shi[j];
    int64_t u = k % C;
    mx[u] = mm > mx[u] ? mm : mx[u];
    cnt[u] += cc;
    sum[u] += ss;
    sat[u] += cc6;
  }
}

/* [R, U], units last (or [N, C*L] of short rows, column u of unit u / L): rows r0..r1, streamed in order.
   Each column's running max, counts and float sum stay in small arrays (in L1/L2 for up to a few thousand
   columns), loaded once per four rows; every ROW_BLOCK rows the float sums and counts are added into
   doubles / int64. */
AI void unit_columns(const float *x, float *y, int64_t r0, int64_t r1, int64_t U, int capped, float cap,
                     float *mx, int64_t *cnt, double *sum, int64_t *sat, float *s, int32_t *c, int32_t *cs) {
  const vf capv = (vf){} + cap;
  for (int64_t b = r0; b < r1; b += ROW_BLOCK) {
    int64_t e = b + ROW_BLOCK < r1 ? b + ROW_BLOCK : r1;
    memset(s, 0, (size_t)U * sizeof *s);
    memset(c, 0, (size_t)U * sizeof *c);
    memset(cs, 0, (size_t)U * sizeof *cs);
    for (int64_t r = b; r < e; r += 4) {
      const int rows = e - r < 4 ? (int)(e - r) : 4;
      const float *x0 = x + r * U;
      float *y0 = y ? y + r * U : NULL;
      int64_t u = 0;
      for (; u + W <= U; u += W) {
        vf m = load(mx + u), sv = load(s + u);
        vi cv = load_i(c + u), sat_v = load_i(cs + u);
        for (int q = 0; q < rows; q++) {
          vf v = load(x0 + q * U + u);
          m = select_((vi)(v > m), v, m);
          cv -= (vi)(v > 0.0f);
          if (capped) sat_v -= (vi)(v >= capv);
          vf o = act(v, capped, capv);
          if (y0) store(y0 + q * U + u, o);
          sv += o;
        }
        store(mx + u, m);
        store(s + u, sv);
        store_i(c + u, cv);
        store_i(cs + u, sat_v);
      }
      for (; u < U; u++)
        for (int q = 0; q < rows; q++) {
          float v = x0[q * U + u];
          mx[u] = v > mx[u] ? v : mx[u];
          c[u] += v > 0.0f;
          cs[u] += capped && v >= cap;
          float o = act1(v, capped, cap);
          if (y0) y0[q * U + u] = o;
          s[u] += o;
        }
    }
    for (int64_t u = 0; u < U; u++) { cnt[u] += c[u]; sum[u] += s[u]; sat[u] += cs[u]; }
  }
}

/* One instantiation per op and instruction set: `capped` is a constant in each, so relu pays nothing for
   relu6's extra compare. */
CLONES static void tail_relu(const float *x, float *y, int64_t k0, int64_t k1, int64_t C, int64_t L, float cap,
                             float *mx, int64_t *cnt, double *sum, int64_t *sat) {
  tail_rows(x, y, k0, k1, C, L, 0, cap, mx, cnt, sum, sat);
}
CLONES static void tail_capped(const float *x, float *y, int64_t k0, int64_t k1, int64_t C, int64_t L,
                               float cap, float *mx, int64_t *cnt, double *sum, int64_t *sat) {
  tail_rows(x, y, k0, k1, C, L, 1, cap, mx, cnt, sum, sat);
}
CLONES static void columns_relu(const float *x, float *y, int64_t r0, int64_t r1, int64_t U, float cap,
                                float *mx, int64_t *cnt, double *sum, int64_t *sat, float *s, int32_t *c,
                                int32_t *cs) {
  unit_columns(x, y, r0, r1, U, 0, cap, mx, cnt, sum, sat, s, c, cs);
}
CLONES static void columns_capped(const float *x, float *y, int64_t r0, int64_t r1, int64_t U, float cap,
                                  float *mx, int64_t *cnt, double *sum, int64_t *sat, float *s, int32_t *c,
                                  int32_t *cs) {
  unit_columns(x, y, r0, r1, U, 1, cap, mx, cnt, sum, sat, s, c, cs);
}

typedef struct {
  int columns, capped;
  float cap;
  const float *x;
  float *y;
  int64_t k0, k1, C, L, width;
  float *mx, *s;
  int64_t *cnt, *sat;
  double *sum;
  int32_t *c, *cs;
} job_t;

static void run_job(job_t *j) {
  if (j->columns) {
    if (j->capped) columns_capped(j->x, j->y, j->k0, j->k1, j->width, j->cap, j->mx, j->cnt, j->sum, j->sat, j->s, j->c, j->cs);
    else columns_relu(j->x, j->y, j->k0, j->k1, j->width, j->cap, j->mx, j->cnt, j->sum, j->sat, j->s, j->c, j->cs);
  } else {
    if (j->capped) tail_capped(j->x, j->y, j->k0, j->k1, j->C, j->L, j->cap, j->mx, j->cnt, j->sum, j->sat);
    else tail_relu(j->x, j->y, j->k0, j->k1, j->C, j->L, j->cap, j->mx, j->cnt, j->sum, j->sat);
  }
}

/* Each array for every thread in turn, the widest type first (all aligned on an 8-byte aligned scratch):
   per column a double sum, int64 count and at-cap count, float max and block sum, int32 block counts. */
#define PER_COLUMN (sizeof(double) + 2 * sizeof(int64_t) + 2 * sizeof(float) + 2 * sizeof(int32_t))

static int clamp_threads(int threads) { return threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads; }

/* The scratch deadrelu_relu_stats needs (the caller keeps it, so that no call allocates). */
int64_t deadrelu_scratch_bytes(int64_t C, int64_t L, int columns, int threads) {
  return (int64_t)clamp_threads(threads) * (columns ? C * L : C) * (int64_t)PER_COLUMN;
}

/* A call's work: `threads` jobs over the batch's rows (or columns' rows), each with its own partial results
   in `scratch`; run them in any order and on any threads, then merge_jobs adds them up in a fixed order. */
typedef struct {
  int threads, columns;
  int64_t C, L;
  job_t jobs[MAX_THREADS];
} plan_t;

static void plan_jobs(plan_t *p, const float *x, float *y, int64_t outer, int64_t C, int64_t L, int columns,
                      int threads, void *scratch, float cap, int capped) {
  int64_t total = columns ? outer : outer * C;
  int64_t width = columns ? C * L : C; /* per-thread partial results */
  threads = clamp_threads(threads);
  if (threads > total) threads = total > 0 ? (int)total : 1;
  p->threads = threads; p->columns = columns; p->C = C; p->L = L;
  char *at = scratch;
  size_t all = (size_t)threads * (size_t)width;
#define TAKE(type) ((type *)(at += all * sizeof(type)) - all)
  double *sums = TAKE(double);
  int64_t *cnts = TAKE(int64_t), *sats = TAKE(int64_t);
  float *maxs = TAKE(float), *partial = TAKE(float);
  int32_t *counts = TAKE(int32_t), *capped_counts = TAKE(int32_t);
#undef TAKE
  for (int t = 0; t < threads; t++) {
    job_t *j = &p->jobs[t];
    size_t off = (size_t)t * width;
    j->columns = columns; j->capped = capped; j->cap = cap;
    j->x = x; j->y = y; j->C = C; j->L = L; j->width = width;
    j->k0 = total * t / threads; j->k1 = total * (t + 1) / threads;
    j->sum = sums + off; j->cnt = cnts + off; j->sat = sats + off; j->mx = maxs + off;
    j->s = partial + off; j->c = counts + off; j->cs = capped_counts + off;
    for (int64_t u = 0; u < width; u++) { j->mx[u] = -INFINITY; j->cnt[u] = 0; j->sat[u] = 0; j->sum[u] = 0.0; }
  }
}

/* The jobs' results per unit, threads in order, into max_acc (NaN where the batch had a NaN, as a float max
   would have it), cnt_acc, sum_acc (and sat_acc when not NULL). */
static void merge_jobs(const plan_t *p, double *max_acc, int64_t *cnt_acc, double *sum_acc, int64_t *sat_acc) {
  int64_t span = p->columns ? p->L : 1;
  for (int64_t u = 0; u < p->C; u++) {
    double m = -INFINITY, s = 0.0;
    int64_t n = 0, n6 = 0;
    for (int t = 0; t < p->threads; t++)
      for (int64_t k = u * span; k < (u + 1) * span; k++) {
        const job_t *j = &p->jobs[t];
        m = j->mx[k] > m ? j->mx[k] : m;
        n += j->cnt[k];
        n6 += j->sat[k];
        s += j->sum[k];
      }
    if (isnan(s)) m = NAN; /* relu keeps a NaN, so its unit's sum is NaN; a float max would be NaN */
    if (isnan(m) || m > max_acc[u]) max_acc[u] = m;
    cnt_acc[u] += n;
    sum_acc[u] += s;
    if (sat_acc) sat_acc[u] += n6;
  }
}

/* One batch of a relu (cap = +inf, sat_acc NULL) or relu6 (cap = 6) site, x as [outer, C, L] (units last:
   L = 1); y may be x (in place), or NULL (statistics only). columns: the batch is read as [outer, C*L]
   (units last, or short rows), else as outer*C rows of L. The batch's max, count and sum per unit (and
   at-cap count) are added into max_acc, cnt_acc, sum_acc (and sat_acc) as merge_jobs says.
   scratch: deadrelu_scratch_bytes(C, L, columns, threads) bytes, 8-byte aligned. */
void deadrelu_relu_stats(const float *x, float *y, int64_t outer, int64_t C, int64_t L, int columns,
                         int threads, void *scratch, float cap, double *max_acc, int64_t *cnt_acc,
                         double *sum_acc, int64_t *sat_acc) {
  plan_t p;
  plan_jobs(&p, x, y, outer, C, L, columns, threads, scratch, cap, sat_acc != NULL);
  threads = p.threads;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; t++) run_job(&p.jobs[t]);
  merge_jobs(&p, max_acc, cnt_acc, sum_acc, sat_acc);
}
