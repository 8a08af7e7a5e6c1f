/* deadrelu: relu_stats.c's kernel as an onnxruntime custom op, deadrelu.ReluStats (deadrelu_cli/native.py
   builds it, probe/onnx_graph.py puts it in the graph, backends/onnx/scan.py registers it with the session).

   ReluStats(x) -> (max, count, sum, size): per unit, the max of x, the count of x > 0 and the sum of
   relu(x), as float64 / int64 / float64 vectors of the units, and the element count of x (int64 scalar).
   ClipStats(x; cap) -> (max, count, sum, size, at_cap): the same for clip(x, 0, cap) (relu6: cap = 6), its
   sum that of the clipped values, and per unit the count of x >= cap (int64).
   x is float32, [N, C, ...] with its units on axis 1 (units_last = 0) or [..., C] with them last
   (units_last = 1). It reads x once and writes nothing of x's size: onnxruntime's own ops need five passes
   for the same statistics (docs/performance.md). Its rows are shared out over onnxruntime's intra-op
   threads (KernelContext_ParallelFor); each job has its own partial results, merged in a fixed order,
   so the numbers do not depend on the threads.

   onnxruntime's wheel ships no C headers, so the few parts of its C API used here are declared below.
   OrtApi is a table of function pointers that only grows from one version to the next (an entry never
   moves), so an entry's index is fixed once it exists; the library asks for API_VERSION, where every
   entry used here exists, and registers nothing on an older runtime (GetApi gives NULL there). */
#include "relu_stats.c"

#include <pthread.h>

#define API_VERSION 20
#define OP_VERSION 16 /* the OrtCustomOp layout below: up to KernelComputeV2 */
#define MAX_RANK 16
#define SCRATCH_LIMIT ((int64_t)64 << 20)

typedef struct OrtStatus OrtStatus;
typedef struct {
  const void *const *(*GetApi)(uint32_t version);
  const char *(*GetVersionString)(void);
} api_base_t;

/* Indices into OrtApi (entry number = byte offset / pointer size). */
enum {
  CREATE_STATUS = 0,
  CREATE_CUSTOM_OP_DOMAIN = 26,
  CUSTOM_OP_DOMAIN_ADD = 27,
  ADD_CUSTOM_OP_DOMAIN = 28,
  GET_TENSOR_MUTABLE_DATA = 51,
  GET_TENSOR_ELEMENT_TYPE = 60,
  GET_DIMENSIONS_COUNT = 61,
  GET_DIMENSIONS = 62,
  GET_TENSOR_TYPE_AND_SHAPE = 65,
  KERNEL_INFO_GET_ATTRIBUTE_FLOAT = 85,
  KERNEL_INFO_GET_ATTRIBUTE_INT64 = 86,
  KERNEL_CONTEXT_GET_INPUT = 90,
  KERNEL_CONTEXT_GET_OUTPUT = 91,
  RELEASE_STATUS = 93,
  RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
  KERNEL_CONTEXT_PARALLEL_FOR = 274,
};
#define CALL(api, index, type, ...) (((type)(api)[index])(__VA_ARGS__))

typedef OrtStatus *(*create_status_f)(int code, const char *message);
typedef OrtStatus *(*create_domain_f)(const char *name, void **out);
typedef OrtStatus *(*domain_add_f)(void *domain, const void *op);
typedef OrtStatus *(*add_domain_f)(void *options, void *domain);
typedef OrtStatus *(*mutable_data_f)(void *value, void **out);
typedef OrtStatus *(*element_type_f)(const void *info, int *out);
typedef OrtStatus *(*dims_count_f)(const void *info, size_t *out);
typedef OrtStatus *(*dims_f)(const void *info, int64_t *values, size_t count);
typedef OrtStatus *(*type_and_shape_f)(const void *value, void **out);
typedef OrtStatus *(*attribute_int64_f)(const void *info, const char *name, int64_t *out);
typedef OrtStatus *(*attribute_float_f)(const void *info, const char *name, float *out);
typedef OrtStatus *(*get_input_f)(const void *context, size_t index, const void **out);
typedef OrtStatus *(*get_output_f)(void *context, size_t index, const int64_t *dims, size_t count, void **out);
typedef void (*release_f)(void *object);
typedef OrtStatus *(*parallel_for_f)(const void *context, void (*fn)(void *, size_t), size_t total,
                                     size_t batches, void *data);

enum { TYPE_FLOAT = 1, TYPE_INT64 = 7, TYPE_DOUBLE = 11 };
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };

typedef struct {
  uint32_t version;
  void *(*CreateKernel)(const void *op, const void *const *api, const void *info);
  const char *(*GetName)(const void *op);
  const char *(*GetExecutionProviderType)(const void *op);
  int (*GetInputType)(const void *op, size_t index);
  size_t (*GetInputTypeCount)(const void *op);
  int (*GetOutputType)(const void *op, size_t index);
  size_t (*GetOutputTypeCount)(const void *op);
  void (*KernelCompute)(void *kernel, void *context);
  void (*KernelDestroy)(void *kernel);
  int (*GetInputCharacteristic)(const void *op, size_t index);
  int (*GetOutputCharacteristic)(const void *op, size_t index);
  int (*GetInputMemoryType)(const void *op, size_t index);
  int (*GetVariadicInputMinArity)(const void *op);
  int (*GetVariadicInputHomogeneity)(const void *op);
  int (*GetVariadicOutputMinArity)(const void *op);
  int (*GetVariadicOutputHomogeneity)(const void *op);
  OrtStatus *(*CreateKernelV2)(const void *op, const void *const *api, const void *info, void **kernel);
  OrtStatus *(*KernelComputeV2)(void *kernel, void *context);
} custom_op_t;

typedef struct {
  const void *const *api;
  int64_t units_last, jobs;
  int capped; /* ClipStats: y = clip(x, 0, cap), and the count at the cap */
  float cap;
  pthread_mutex_t lock; /* the scratch below: one Compute at a time uses it, another allocates its own */
  void *scratch;
  int64_t scratch_bytes;
} kernel_t;

static OrtStatus *fail(const void *const *api, int code, const char *message) {
  return CALL(api, CREATE_STATUS, create_status_f, code, message);
}

#define CHECK(expr)                        \
  do {                                     \
    OrtStatus *status_ = (expr);           \
    if (status_) return status_;           \
  } while (0)

static void run_one(void *data, size_t index) { run_job(&((plan_t *)data)->jobs[index]); }

static OrtStatus *compute(void *opaque, void *context) {
  kernel_t *k = opaque;
  const void *const *api = k->api;
  const void *x = NULL;
  void *info = NULL, *data = NULL;
  CHECK(CALL(api, KERNEL_CONTEXT_GET_INPUT, get_input_f, context, 0, &x));
  CHECK(CALL(api, GET_TENSOR_TYPE_AND_SHAPE, type_and_shape_f, x, &info));
  int type = 0;
  size_t rank = 0;
  int64_t dims[MAX_RANK];
  OrtStatus *status = CALL(api, GET_TENSOR_ELEMENT_TYPE, element_type_f, info, &type);
  if (!status) status = CALL(api, GET_DIMENSIONS_COUNT, dims_count_f, info, &rank);
  if (!status && rank <= MAX_RANK) status = CALL(api, GET_DIMENSIONS, dims_f, info, dims, rank);
  CALL(api, RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, release_f, info);
  if (status) return status;
  if (type != TYPE_FLOAT) return fail(api, ORT_INVALID_ARGUMENT, "deadrelu.ReluStats: x must be float32");
  if (rank > MAX_RANK || rank < (k->units_last ? 1u : 2u))
    return fail(api, ORT_INVALID_ARGUMENT, "deadrelu.ReluStats: x has no unit axis of that kind");
  int64_t outer = 1, C, L = 1;
  if (k->units_last) {
    C = dims[rank - 1];
    for (size_t i = 0; i + 1 < rank; i++) outer *= dims[i];
  } else {
    outer = dims[0];
    C = dims[1];
    for (size_t i = 2; i < rank; i++) L *= dims[i];
  }
  /* units last: [outer, C] down its columns; [N, C, L]: short rows down their columns too (relu_stats.c) */
  int columns = k->units_last || (L < 128 && C * L <= (1 << 17));
  void *out[5];
  int64_t none = 0;
  for (int i = 0; i < 3; i++) CHECK(CALL(api, KERNEL_CONTEXT_GET_OUTPUT, get_output_f, context, i, &C, 1, &out[i]));
  CHECK(CALL(api, KERNEL_CONTEXT_GET_OUTPUT, get_output_f, context, 3, &none, 0, &out[3]));
  int64_t *at_cap = NULL;
  if (k->capped) {
    CHECK(CALL(api, KERNEL_CONTEXT_GET_OUTPUT, get_output_f, context, 4, &C, 1, &out[4]));
    CHECK(CALL(api, GET_TENSOR_MUTABLE_DATA, mutable_data_f, out[4], (void **)&at_cap));
    for (int64_t u = 0; u < C; u++) at_cap[u] = 0;
  }
  double *mx, *sum;
  int64_t *cnt, *size;
  CHECK(CALL(api, GET_TENSOR_MUTABLE_DATA, mutable_data_f, out[0], (void **)&mx));
  CHECK(CALL(api, GET_TENSOR_MUTABLE_DATA, mutable_data_f, out[1], (void **)&cnt));
  CHECK(CALL(api, GET_TENSOR_MUTABLE_DATA, mutable_data_f, out[2], (void **)&sum));
  CHECK(CALL(api, GET_TENSOR_MUTABLE_DATA, mutable_data_f, out[3], (void **)&size));
  CHECK(CALL(api, GET_TENSOR_MUTABLE_DATA, mutable_data_f, (void *)x, &data));
  for (int64_t u = 0; u < C; u++) { mx[u] = -INFINITY; cnt[u] = 0; sum[u] = 0.0; }
  *size = outer * C * L;
  int threads = (int)k->jobs;
  /* each job keeps partial results per column: at most SCRATCH_LIMIT bytes of them beyond one job's */
  int64_t per_job = deadrelu_scratch_bytes(C, L, columns, 1);
  while (threads > 1 && per_job * threads > SCRATCH_LIMIT) threads--;
  int64_t need = deadrelu_scratch_bytes(C, L, columns, threads);
  void *scratch = NULL, *own = NULL;
  int locked = pthread_mutex_trylock(&k->lock) == 0;
  if (locked) {
    if (k->scratch_bytes < need) {
      free(k->scratch);
      k->scratch = malloc((size_t)need);
      k->scratch_bytes = k->scratch ? need : 0;
    }
    scratch = k->scratch;
  } else {
    scratch = own = malloc((size_t)need);
  }
  if (!scratch) {
    if (locked) pthread_mutex_unlock(&k->lock);
    return fail(api, ORT_FAIL, "deadrelu.ReluStats: out of memory");
  }
  plan_t plan;
  plan_jobs(&plan, data, NULL, outer, C, L, columns, threads, scratch, k->capped ? k->cap : INFINITY, k->capped);
  status = CALL(api, KERNEL_CONTEXT_PARALLEL_FOR, parallel_for_f, context, run_one, (size_t)plan.threads,
                (size_t)plan.threads, &plan);
  if (!status) merge_jobs(&plan, mx, cnt, sum, at_cap);
  if (locked) pthread_mutex_unlock(&k->lock);
  free(own);
  return status;
}

static const custom_op_t CLIP_STATS;

static OrtStatus *create(const void *op, const void *const *api, const void *info, void **out) {
  kernel_t *k = calloc(1, sizeof *k);
  if (!k) return fail(api, ORT_FAIL, "deadrelu.ReluStats: out of memory");
  k->api = api;
  k->jobs = 2;
  OrtStatus *status = CALL(api, KERNEL_INFO_GET_ATTRIBUTE_INT64, attribute_int64_f, info, "units_last", &k->units_last);
  if (status) { CALL(api, RELEASE_STATUS, release_f, status); k->units_last = 0; }
  status = CALL(api, KERNEL_INFO_GET_ATTRIBUTE_INT64, attribute_int64_f, info, "jobs", &k->jobs);
  if (status) { CALL(api, RELEASE_STATUS, release_f, status); k->jobs = 2; }
  k->jobs = clamp_threads((int)(k->jobs > MAX_THREADS ? MAX_THREADS : k->jobs));
  if (op == &CLIP_STATS) {
    k->capped = 1;
    status = CALL(api, KERNEL_INFO_GET_ATTRIBUTE_FLOAT, attribute_float_f, info, "cap", &k->cap);
    if (status || !(k->cap > 0.0f)) { /* a cap is what makes it ClipStats; not above 0: no clip of a relu */
      if (status) CALL(api, RELEASE_STATUS, release_f, status);
      free(k);
      return fail(api, ORT_INVALID_ARGUMENT, "deadrelu.ClipStats: needs a float attribute cap above 0");
    }
  }
  pthread_mutex_init(&k->lock, NULL);
  *out = k;
  return NULL;
}

static void destroy(void *opaque) {
  kernel_t *k = opaque;
  if (!k) return;
  pthread_mutex_destroy(&k->lock);
  free(k->scratch);
  free(k);
}

/* The version 1 entry points, for a runtime that does not call the V2 ones. */
static void *create_v1(const void *op, const void *const *api, const void *info) {
  void *kernel = NULL;
  OrtStatus *status = create(op, api, info, &kernel);
  if (status) CALL(api, RELEASE_STATUS, release_f, status);
  return kernel;
}
static void compute_v1(void *kernel, void *context) {
  OrtStatus *status = compute(kernel, context);
  if (status) CALL(((kernel_t *)kernel)->api, RELEASE_STATUS, release_f, status);
}

static const char *name(const void *op) { (void)op; return "ReluStats"; }
static const char *clip_name(const void *op) { (void)op; return "ClipStats"; }
static const char *provider(const void *op) { (void)op; return "CPUExecutionProvider"; }
static int input_type(const void *op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static size_t one(const void *op) { (void)op; return 1; }
static int output_type(const void *op, size_t i) {
  (void)op;
  return i == 1 || i >= 3 ? TYPE_INT64 : TYPE_DOUBLE;
}
static size_t four(const void *op) { (void)op; return 4; }
static size_t five(const void *op) { (void)op; return 5; }
static int required(const void *op, size_t i) { (void)op; (void)i; return 0; }
static int default_memory(const void *op, size_t i) { (void)op; (void)i; return 0; }
static int arity(const void *op) { (void)op; return 1; }

static const custom_op_t RELU_STATS = {
    OP_VERSION, create_v1, name, provider, input_type, one, output_type, four, compute_v1, destroy,
    required, required, default_memory, arity, arity, arity, arity, create, compute,
};
static const custom_op_t CLIP_STATS = {
    OP_VERSION, create_v1, clip_name, provider, input_type, one, output_type, five, compute_v1, destroy,
    required, required, default_memory, arity, arity, arity, arity, create, compute,
};

/* onnxruntime calls this when the library is registered with a session's options. */
OrtStatus *RegisterCustomOps(void *options, const api_base_t *base) {
  const void *const *api = base->GetApi(API_VERSION);
  if (!api) return NULL; /* an older runtime: the op stays unknown and the session says so */
  void *domain = NULL;
  /* kept for the process's life: a domain must outlive every session that uses it */
  CHECK(CALL(api, CREATE_CUSTOM_OP_DOMAIN, create_domain_f, "deadrelu", &domain));
  CHECK(CALL(api, CUSTOM_OP_DOMAIN_ADD, domain_add_f, domain, &RELU_STATS));
  CHECK(CALL(api, CUSTOM_OP_DOMAIN_ADD, domain_add_f, domain, &CLIP_STATS));
  return CALL(api, ADD_CUSTOM_OP_DOMAIN, add_domain_f, options, domain);
}
