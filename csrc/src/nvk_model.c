/* nextvit_kernels whole-model runtime: a model file loaded once, then one call per forward that
 * walks the folded plan over the AOT kernels (nextvit_kernels.h, "the whole model").
 *
 * The model file is safetensors ([u64 LE header length][JSON header][data]). Its first tensor,
 * at data offset 0, is __nvk_plan__: an int64 table that this file reads at fixed offsets, so no
 * JSON is parsed here; the JSON header and its metadata describe the same plan for people and
 * the safetensors package. nextvit_kernels/model_file.py writes both; the table's layout changes
 * only together with NVK_MODEL_ABI_VERSION:
 *   head    [16]          magic, format version, ABI version, dtype, n_steps, n_tensors, has_head,
 *                         n_classes, n_stage_norms, in_channels, then zeros
 *   steps   [n_steps][12] op, flags (1: reads the branch, 2: writes the branch, 4: the branch is
 *                         x2), stage_end (-1, 0..3), first tensor, n_tensors, key[6], 0
 *   head    [4]           channels, n_classes, tensor w, tensor b (all -1 without a head)
 *   norms   [n][3]        channels, tensor scale, tensor shift (n: 0 or 4)
 *   tensors [n][8]        data offset, bytes, dtype, ndim, dims[4] (0 past ndim)
 * Every value is checked before use: counts and indices in range, offsets inside the data and
 * increasing, sizes equal to their dims, every shape consistent with its op's key and with the
 * channels flowing from the previous step. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nvk_internal.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the model file's plan table is little-endian: a big-endian host needs byte swaps here"
#endif

#define PLAN_MAGIC 0x314E414C504B564EULL /* "NVKPLAN1" */
#define FORMAT_VERSION 1
#define HEAD_LEN 16
#define STEP_LEN 12
#define HEADREC_LEN 4
#define NORM_LEN 3
#define TENSOR_LEN 8
#define MAX_STEPS 1024
#define MAX_TENSORS 8192
#define MAX_CLASSES 16            /* probe classes of one (op, dtype, key) */
#define MAX_HEADER (64ull << 20)  /* a safetensors JSON header is a few hundred KB */
#define MAX_DIM (1ll << 30)
#define FROM_BRANCH 1
#define TO_BRANCH 2
#define X2_BRANCH 4

static const int n_tensors_of[NVK_NUM_OPS] = {2, 2, 3, 4, 8, 2};
static const int key_len_of[NVK_NUM_OPS] = {3, 3, 3, 5, 5, 2};

typedef struct {
  int64_t off, bytes;
  int ndim;
  int64_t dims[4];
} tensor_t;

typedef struct {
  int n;
  const nvk_shape_class_t* c[MAX_CLASSES];
} classes_t;

typedef struct {
  int op, flags, stage_end, t0;
  int key[NVK_KEY_LEN];
  classes_t cls[2]; /* by nvk_layout: only the stem's first conv differs (its NCHW variant) */
} step_t;

typedef struct {
  int c;
  int scale, shift; /* tensor indices */
  CUdeviceptr w;    /* diag(scale) [c, c]: the affine runs as a 1x1 conv (patch_embed, stride 1) */
  classes_t cls;
} norm_t;

struct nvk_model {
  unsigned generation; /* nvki_driver_generation() at load */
  int device;
  CUcontext ctx;
  nvk_dtype dt;
  int n_steps, n_tensors, n_classes, in_channels, n_norms;
  step_t* steps;
  tensor_t* tensors;
  CUdeviceptr* dev;    /* each tensor's device copy */
  int head_c, head_w, head_b;
  classes_t head_cls;
  norm_t norms[4];
  int feat_c[4];
  size_t weight_bytes;
};

/* ------------------------------------------------------------------ parsing */
typedef struct {
  const unsigned char* p;  /* the plan table */
  size_t n;                /* its int64 count */
} table_t;

static int64_t at(const table_t* t, size_t i) {
  int64_t v;
  memcpy(&v, t->p + 8 * i, 8); /* the data is not 8-byte aligned in general */
  return v;
}

#define BAD(...) nvki_fail(NVK_ERR_INVALID, __VA_ARGS__)
#define CHK(cond, ...) \
  do {                 \
    if (!(cond)) return BAD(__VA_ARGS__); \
  } while (0)

static const char* op_name(int op) { return op >= 0 && op < NVK_NUM_OPS ? nvki_op_names[op] : "?"; }

/* The tensor at index `ti` has exactly these dims (n of them). */
static nvk_status want_dims(const nvk_model* m, const char* what, int step, int ti, int n, const int64_t* d) {
  const tensor_t* t = &m->tensors[ti];
  int same = t->ndim == n;
  for (int i = 0; same && i < n; ++i) same = t->dims[i] == d[i];
  if (same) return NVK_OK;
  char got[96], want[96];
  int a = 0, b = 0;
  for (int i = 0; i < t->ndim; ++i) a += snprintf(got + a, sizeof got - a, i ? ", %lld" : "%lld", (long long)t->dims[i]);
  for (int i = 0; i < n; ++i) b += snprintf(want + b, sizeof want - b, i ? ", %lld" : "%lld", (long long)d[i]);
  return BAD("nvk_model: step %d (%s): tensor %d (%s) has shape [%s], the step's key needs [%s]", step,
             step >= 0 ? op_name(m->steps[step].op) : "head", ti, what, got, want);
}
#define DIMS(what, ti, ...)                                                                  \
  do {                                                                                       \
    const int64_t d_[] = {__VA_ARGS__};                                                      \
    nvk_status s_ = want_dims(m, what, i, (ti), (int)(sizeof d_ / sizeof *d_), d_);          \
    if (s_) return s_;                                                                       \
  } while (0)

static nvk_status parse_tensors(nvk_model* m, const table_t* t, size_t base, size_t plan_bytes, size_t data_size) {
  int64_t prev_end = (int64_t)plan_bytes;
  size_t es = elem_size(m->dt);
  for (int i = 0; i < m->n_tensors; ++i) {
    size_t r = base + (size_t)i * TENSOR_LEN;
    tensor_t* x = &m->tensors[i];
    int64_t dtype = at(t, r + 2), ndim = at(t, r + 3);
    x->off = at(t, r);
    x->bytes = at(t, r + 1);
    CHK(dtype == m->dt, "nvk_model: tensor %d has dtype %lld, the file's dtype is %d", i, (long long)dtype, (int)m->dt);
    CHK(ndim >= 1 && ndim <= 4, "nvk_model: tensor %d has %lld dims (1 to 4)", i, (long long)ndim);
    x->ndim = (int)ndim;
    int64_t count = 1;
    for (int k = 0; k < 4; ++k) {
      int64_t d = at(t, r + 4 + k);
      x->dims[k] = d;
      if (k < ndim) {
        CHK(d >= 1 && d <= MAX_DIM, "nvk_model: tensor %d: dim %d is %lld", i, k, (long long)d);
        CHK(count <= MAX_DIM * 8 / d, "nvk_model: tensor %d: more than 2^33 elements", i);
        count *= d;
      } else {
        CHK(d == 0, "nvk_model: tensor %d: dim %d past its %lld dims is %lld, not 0", i, k, (long long)ndim,
            (long long)d);
      }
    }
    CHK(x->bytes == count * (int64_t)es, "nvk_model: tensor %d: %lld bytes for %lld elements of %zu bytes", i,
        (long long)x->bytes, (long long)count, es);
    CHK(x->off >= prev_end, "nvk_model: tensor %d starts at data offset %lld, inside the plan or the tensor before it "
        "(which ends at %lld)", i, (long long)x->off, (long long)prev_end);
    CHK(x->off <= (int64_t)data_size && x->bytes <= (int64_t)data_size - x->off,
        "nvk_model: tensor %d ([%lld, +%lld)) runs past the end of the file's %zu data bytes (truncated file?)", i,
        (long long)x->off, (long long)x->bytes, data_size);
    prev_end = x->off + x->bytes;
  }
  return NVK_OK;
}

/* Step i's key, tensors and flags against the channels flowing in (*main_c, *branch_c: -1 none). */
static nvk_status check_step(nvk_model* m, int i, int* main_c, int* branch_c, int* stage) {
  step_t* s = &m->steps[i];
  const int* k = s->key;
  int from = s->flags & FROM_BRANCH, to = s->flags & TO_BRANCH, x2 = s->flags & X2_BRANCH;
  CHK(!from || *branch_c > 0, "nvk_model: step %d (%s) reads the branch tensor before any step wrote it", i,
      op_name(s->op));
  int in_c = from ? *branch_c : *main_c, out_c = 0, t = s->t0;
  for (int j = key_len_of[s->op]; j < NVK_KEY_LEN; ++j)
    CHK(k[j] == 0, "nvk_model: step %d (%s): key[%d] = %d past its key, not 0", i, op_name(s->op), j, k[j]);
  for (int j = 0; j < key_len_of[s->op]; ++j)
    CHK(k[j] >= 0 && k[j] <= MAX_DIM, "nvk_model: step %d (%s): key[%d] = %d", i, op_name(s->op), j, k[j]);
  CHK(!x2 || s->op == NVK_OP_MLP, "nvk_model: step %d (%s) takes no x2", i, op_name(s->op));
  switch (s->op) {
    case NVK_OP_CONV_BN_RELU:
    case NVK_OP_PATCH_EMBED:
      CHK(k[0] == in_c && k[1] > 0 && (k[2] == 1 || k[2] == 2),
          "nvk_model: step %d (%s): key (c_in, c_out, stride) = (%d, %d, %d) with %d channels flowing in", i,
          op_name(s->op), k[0], k[1], k[2], in_c);
      if (s->op == NVK_OP_CONV_BN_RELU) DIMS("w", t, k[1], k[0], 3, 3);
      else DIMS("w", t, k[1], k[0]);
      DIMS("b", t + 1, k[1]);
      out_c = k[1];
      break;
    case NVK_OP_MHCA:
      CHK(k[0] == in_c && k[0] % 32 == 0 && k[1] > 0 && (k[2] == 0 || (k[2] == 1 && k[1] == k[0])),
          "nvk_model: step %d (mhca): key (c, c_out, residual) = (%d, %d, %d) with %d channels flowing in", i, k[0],
          k[1], k[2], in_c);
      DIMS("conv_w", t, k[0], 32, 3, 3);
      DIMS("conv_b", t + 1, k[0]);
      DIMS("proj_w", t + 2, k[1], k[0]);
      out_c = k[1];
      break;
    case NVK_OP_MLP:
      CHK(k[0] == in_c && k[1] == (x2 ? *branch_c : 0) && k[2] > 0 && k[3] > 0 &&
              (k[4] == 0 || (k[4] == 1 && k[3] == k[0] + k[1])),
          "nvk_model: step %d (mlp): key (c1, c2, hidden, c_out, residual) = (%d, %d, %d, %d, %d) with %d + %d "
          "channels flowing in", i, k[0], k[1], k[2], k[3], k[4], in_c, x2 ? *branch_c : 0);
      DIMS("fc1_w", t, k[2], k[0] + k[1]);
      DIMS("fc1_b", t + 1, k[2]);
      DIMS("fc2_w", t + 2, k[3], k[2]);
      DIMS("fc2_b", t + 3, k[3]);
      out_c = k[3];
      break;
    case NVK_OP_E_MHSA:
      CHK(k[0] == in_c && k[1] > 0 && k[2] >= 1 && k[2] <= 64 && k[3] >= 16 && k[3] <= 128 && !(k[3] & (k[3] - 1)) &&
              k[0] % k[3] == 0 && (k[4] == 0 || (k[4] == 1 && k[1] == k[0])),
          "nvk_model: step %d (e_mhsa): key (c, c_out, sr_ratio, head_dim, residual) = (%d, %d, %d, %d, %d) with %d "
          "channels flowing in", i, k[0], k[1], k[2], k[3], k[4], in_c);
      DIMS("q_w", t, k[0], k[0]);
      DIMS("q_b", t + 1, k[0]);
      DIMS("k_w", t + 2, k[0], k[0]);
      DIMS("k_b", t + 3, k[0]);
      DIMS("v_w", t + 4, k[0], k[0]);
      DIMS("v_b", t + 5, k[0]);
      DIMS("proj_w", t + 6, k[1], k[0]);
      DIMS("proj_b", t + 7, k[1]);
      out_c = k[1];
      break;
    default:
      return BAD("nvk_model: step %d: op %d is not a step (0 to 4)", i, s->op);
  }
  if (to) *branch_c = out_c;
  else *main_c = out_c;
  if (s->stage_end >= 0) {
    CHK(!to && s->stage_end == *stage, "nvk_model: step %d ends stage %d, expected stage %d on the main tensor", i,
        s->stage_end, *stage);
    m->feat_c[(*stage)++] = out_c;
  }
  return NVK_OK;
}

static void candidates(int op, nvk_dtype dt, const int* key, int nkey, classes_t* out) {
  out->n = 0;
  for (int i = 0; i < nvk_num_shape_classes && out->n < MAX_CLASSES; ++i) {
    const nvk_shape_class_t* s = &nvk_shape_classes[i];
    if (s->op != op || s->dtype != (int)dt) continue;
    int same = 1;
    for (int j = 0; j < nkey; ++j) same &= s->key[j] == key[j];
    if (same) out->c[out->n++] = s;
  }
}

static nvk_status resolve(nvk_model* m) {
  for (int i = 0; i < m->n_steps; ++i) {
    step_t* s = &m->steps[i];
    int key[NVK_KEY_LEN];
    memcpy(key, s->key, sizeof key);
    candidates(s->op, m->dt, key, key_len_of[s->op] + (s->op == NVK_OP_CONV_BN_RELU), &s->cls[NVK_NHWC]);
    if (!s->cls[NVK_NHWC].n)
      return nvki_unsupported(s->op, m->dt, key, key_len_of[s->op], "the model file's step key");
    if (s->op == NVK_OP_CONV_BN_RELU && i == 0) {
      key[3] = 1; /* NCHW input: may be absent (then only NHWC images run) */
      candidates(s->op, m->dt, key, 4, &s->cls[NVK_NCHW]);
    } else {
      s->cls[NVK_NCHW] = s->cls[NVK_NHWC];
    }
  }
  if (m->n_classes) {
    int key[2] = {m->head_c, m->n_classes};
    candidates(NVK_OP_HEAD, m->dt, key, 2, &m->head_cls);
    if (!m->head_cls.n) return nvki_unsupported(NVK_OP_HEAD, m->dt, key, 2, "c, n_classes");
  }
  for (int s = 0; s < m->n_norms; ++s) {
    int key[3] = {m->norms[s].c, m->norms[s].c, 1};
    candidates(NVK_OP_PATCH_EMBED, m->dt, key, 3, &m->norms[s].cls);
    if (!m->norms[s].cls.n)
      return nvki_unsupported(NVK_OP_PATCH_EMBED, m->dt, key, 3, "the stage norm's c, c, 1 (a 1x1 conv)");
  }
  return NVK_OK;
}

static nvk_status parse(nvk_model* m, const unsigned char* data, size_t size, const unsigned char** blob) {
  CHK(size >= 8, "nvk_model: %zu bytes: too short for a safetensors file", size);
  uint64_t hl;
  memcpy(&hl, data, 8);
  CHK(hl >= 2 && hl <= MAX_HEADER && hl <= size - 8,
      "nvk_model: the safetensors header length %llu does not fit the file's %zu bytes (truncated or not safetensors)",
      (unsigned long long)hl, size);
  CHK(data[8] == '{', "nvk_model: not a safetensors file (its header does not start with '{')");
  const unsigned char* d = data + 8 + hl;
  size_t dsize = size - 8 - (size_t)hl;
  *blob = d;
  table_t t = {d, dsize / 8};
  CHK(t.n >= HEAD_LEN, "nvk_model: %zu data bytes: no room for the __nvk_plan__ table (truncated file?)", dsize);
  CHK((uint64_t)at(&t, 0) == PLAN_MAGIC,
      "nvk_model: no __nvk_plan__ table at the start of the data: not a nextvit_kernels model file "
      "(nextvit_kernels.save_runtime writes them)");
  int64_t version = at(&t, 1), abi = at(&t, 2), dt = at(&t, 3), n_steps = at(&t, 4), n_tensors = at(&t, 5);
  int64_t has_head = at(&t, 6), n_classes = at(&t, 7), n_norms = at(&t, 8), in_c = at(&t, 9);
  if (version != FORMAT_VERSION)
    return nvki_fail(version > FORMAT_VERSION ? NVK_ERR_UNSUPPORTED : NVK_ERR_INVALID,
                     "nvk_model: model file format version %lld; this library reads version %d", (long long)version,
                     FORMAT_VERSION);
  if (abi != NVK_MODEL_ABI_VERSION)
    return nvki_fail(abi > NVK_MODEL_ABI_VERSION ? NVK_ERR_UNSUPPORTED : NVK_ERR_INVALID,
                     "nvk_model: the file needs library ABI %lld; this library (%s) has ABI %d", (long long)abi,
                     nvk_version(), NVK_MODEL_ABI_VERSION);
  CHK(dt >= 0 && dt <= 2, "nvk_model: dtype %lld (0 fp32, 1 fp16, 2 bf16)", (long long)dt);
  CHK(n_steps >= 1 && n_steps <= MAX_STEPS, "nvk_model: %lld steps (1 to %d)", (long long)n_steps, MAX_STEPS);
  CHK(n_tensors >= 1 && n_tensors <= MAX_TENSORS, "nvk_model: %lld tensors (1 to %d)", (long long)n_tensors,
      MAX_TENSORS);
  CHK((has_head == 1 && n_classes >= 1 && n_classes <= (1 << 20)) || (has_head == 0 && n_classes == 0),
      "nvk_model: has_head %lld with %lld classes", (long long)has_head, (long long)n_classes);
  CHK(n_norms == 0 || n_norms == 4, "nvk_model: %lld stage norms (0 or 4)", (long long)n_norms);
  CHK(in_c == 3, "nvk_model: %lld input channels (3)", (long long)in_c);
  for (int i = 10; i < HEAD_LEN; ++i) CHK(at(&t, i) == 0, "nvk_model: plan header field %d is not 0", i);
  size_t len = HEAD_LEN + (size_t)n_steps * STEP_LEN + HEADREC_LEN + (size_t)n_norms * NORM_LEN +
               (size_t)n_tensors * TENSOR_LEN;
  CHK(len <= t.n, "nvk_model: the plan table needs %zu bytes, the data has %zu (truncated file?)", 8 * len, dsize);
  m->dt = (nvk_dtype)dt;
  m->n_steps = (int)n_steps;
  m->n_tensors = (int)n_tensors;
  m->n_classes = (int)n_classes;
  m->n_norms = (int)n_norms;
  m->in_channels = (int)in_c;
  m->steps = (step_t*)calloc((size_t)n_steps, sizeof *m->steps);
  m->tensors = (tensor_t*)calloc((size_t)n_tensors, sizeof *m->tensors);
  m->dev = (CUdeviceptr*)calloc((size_t)n_tensors, sizeof *m->dev);
  if (!m->steps || !m->tensors || !m->dev) return nvki_fail(NVK_ERR_CUDA, "nvk_model: out of host memory");
  size_t steps_at = HEAD_LEN, head_at = steps_at + (size_t)n_steps * STEP_LEN, norms_at = head_at + HEADREC_LEN;
  size_t tensors_at = norms_at + (size_t)n_norms * NORM_LEN;
  nvk_status st = parse_tensors(m, &t, tensors_at, 8 * len, dsize);
  if (st) return st;
  int main_c = (int)in_c, branch_c = -1, stage = 0;
  for (int i = 0; i < m->n_steps; ++i) {
    size_t r = steps_at + (size_t)i * STEP_LEN;
    step_t* s = &m->steps[i];
    int64_t op = at(&t, r), flags = at(&t, r + 1), se = at(&t, r + 2), t0 = at(&t, r + 3), nt = at(&t, r + 4);
    CHK(op >= 0 && op < NVK_OP_HEAD, "nvk_model: step %d: op %lld (0 to 4)", i, (long long)op);
    CHK(flags >= 0 && flags <= 7, "nvk_model: step %d: flags %lld", i, (long long)flags);
    CHK(se >= -1 && se <= 3, "nvk_model: step %d: stage_end %lld", i, (long long)se);
    CHK(nt == n_tensors_of[op] && t0 >= 0 && t0 <= n_tensors - nt,
        "nvk_model: step %d (%s): tensors [%lld, +%lld) (it takes %d, the file has %lld)", i, op_name((int)op),
        (long long)t0, (long long)nt, n_tensors_of[op], (long long)n_tensors);
    CHK(at(&t, r + 11) == 0, "nvk_model: step %d: reserved field is not 0", i);
    s->op = (int)op;
    s->flags = (int)flags;
    s->stage_end = (int)se;
    s->t0 = (int)t0;
    for (int j = 0; j < NVK_KEY_LEN; ++j) {
      int64_t v = at(&t, r + 5 + j);
      CHK(v >= 0 && v <= MAX_DIM, "nvk_model: step %d: key[%d] = %lld", i, j, (long long)v);
      s->key[j] = (int)v;
    }
    if (i == 0) CHK(op == NVK_OP_CONV_BN_RELU && !flags, "nvk_model: the first step must be the stem's conv");
    st = check_step(m, i, &main_c, &branch_c, &stage);
    if (st) return st;
  }
  CHK(stage == 4, "nvk_model: the plan ends %d stages, not 4", stage);
  int64_t hc = at(&t, head_at), hn = at(&t, head_at + 1), hw = at(&t, head_at + 2), hb = at(&t, head_at + 3);
  if (has_head) {
    CHK(hc == main_c && hn == n_classes && hw >= 0 && hw < n_tensors && hb >= 0 && hb < n_tensors,
        "nvk_model: head record (%lld, %lld, %lld, %lld) for %d channels and %lld classes", (long long)hc,
        (long long)hn, (long long)hw, (long long)hb, main_c, (long long)n_classes);
    m->head_c = (int)hc;
    m->head_w = (int)hw;
    m->head_b = (int)hb;
    int i = -1; /* DIMS names the step */
    DIMS("head w", m->head_w, hn, hc);
    DIMS("head b", m->head_b, hn);
  } else {
    CHK(hc == -1 && hn == -1 && hw == -1 && hb == -1, "nvk_model: a file without a head has a head record");
  }
  for (int s = 0; s < m->n_norms; ++s) {
    size_t r = norms_at + (size_t)s * NORM_LEN;
    int64_t c = at(&t, r), sc = at(&t, r + 1), sh = at(&t, r + 2);
    CHK(c == m->feat_c[s] && sc >= 0 && sc < n_tensors && sh >= 0 && sh < n_tensors,
        "nvk_model: stage norm %d record (%lld, %lld, %lld) for a stage of %d channels", s, (long long)c,
        (long long)sc, (long long)sh, m->feat_c[s]);
    m->norms[s].c = (int)c;
    m->norms[s].scale = (int)sc;
    m->norms[s].shift = (int)sh;
    int i = -1;
    DIMS("stage norm scale", (int)sc, c);
    DIMS("stage norm shift", (int)sh, c);
  }
  return resolve(m);
}

/* ------------------------------------------------------------------ load / free */
static void release(nvk_model* m) {
  if (m->dev && m->ctx && m->generation == nvki_driver_generation() && nvki_drv.cuCtxPushCurrent &&
      nvki_drv.cuCtxPushCurrent(m->ctx) == CUDA_SUCCESS) {
    for (int i = 0; i < m->n_tensors; ++i)
      if (m->dev[i]) nvki_drv.cuMemFree(m->dev[i]);
    for (int s = 0; s < m->n_norms; ++s)
      if (m->norms[s].w) nvki_drv.cuMemFree(m->norms[s].w);
    CUcontext popped;
    nvki_drv.cuCtxPopCurrent(&popped);
  }
  /* a model of an earlier driver (nvk_reset_driver since) leaves its memory to that driver */
  free(m->steps);
  free(m->tensors);
  free(m->dev);
  free(m);
}

void nvk_model_free(nvk_model* m) {
  if (m) release(m);
}

static nvk_status upload(nvk_model* m, const unsigned char* blob, int device) {
  nvk_call_t call;
  nvk_status st = nvki_enter_device(device, &call);
  if (st) return st;
  m->ctx = call.c->ctx;
  m->device = call.c->dev;
  m->generation = nvki_driver_generation();
  CUresult r;
  for (int i = 0; i < m->n_tensors && !st; ++i) {
    const tensor_t* t = &m->tensors[i];
    if ((r = nvki_drv.cuMemAlloc(&m->dev[i], (size_t)t->bytes)) != CUDA_SUCCESS) {
      m->dev[i] = 0;
      st = nvki_cu_fail(r, "nvk_model_load: cuMemAlloc");
    } else if ((r = nvki_drv.cuMemcpyHtoD(m->dev[i], blob + t->off, (size_t)t->bytes)) != CUDA_SUCCESS) {
      st = nvki_cu_fail(r, "nvk_model_load: cuMemcpyHtoD");
    }
    m->weight_bytes += (size_t)t->bytes;
  }
  size_t es = elem_size(m->dt);
  for (int s = 0; s < m->n_norms && !st; ++s) {
    norm_t* n = &m->norms[s];
    const tensor_t* scale = &m->tensors[n->scale];
    size_t bytes = (size_t)n->c * (size_t)n->c * es;
    unsigned char* diag = (unsigned char*)calloc(1, bytes);
    if (!diag) {
      st = nvki_fail(NVK_ERR_CUDA, "nvk_model_load: out of host memory");
      break;
    }
    for (int c = 0; c < n->c; ++c) memcpy(diag + ((size_t)c * n->c + c) * es, blob + scale->off + c * es, es);
    if ((r = nvki_drv.cuMemAlloc(&n->w, bytes)) != CUDA_SUCCESS) {
      n->w = 0;
      st = nvki_cu_fail(r, "nvk_model_load: cuMemAlloc");
    } else if ((r = nvki_drv.cuMemcpyHtoD(n->w, diag, bytes)) != CUDA_SUCCESS) {
      st = nvki_cu_fail(r, "nvk_model_load: cuMemcpyHtoD");
    }
    free(diag);
    m->weight_bytes += bytes;
  }
  return nvki_leave(&call, st);
}

nvk_status nvk_model_load_memory(const void* data, size_t size, int device, nvk_model** model) {
  if (!model) return BAD("nvk_model_load: model is NULL");
  *model = NULL;
  if (!data) return BAD("nvk_model_load: data is NULL");
  if (device < 0 && device != NVK_NO_DEVICE) return BAD("nvk_model_load: device %d", device);
  nvk_model* m = (nvk_model*)calloc(1, sizeof *m);
  if (!m) return nvki_fail(NVK_ERR_CUDA, "nvk_model_load: out of host memory");
  const unsigned char* blob = NULL;
  nvk_status st = parse(m, (const unsigned char*)data, size, &blob);
  if (!st && device != NVK_NO_DEVICE) st = upload(m, blob, device);
  if (st) {
    release(m); /* what upload allocated before failing */
    return st;
  }
  *model = m;
  nvki_ok();
  return NVK_OK;
}

nvk_status nvk_model_load(const char* path, int device, nvk_model** model) {
  if (!model) return BAD("nvk_model_load: model is NULL");
  *model = NULL;
  if (!path) return BAD("nvk_model_load: path is NULL");
  FILE* f = fopen(path, "rb");
  if (!f) return BAD("nvk_model_load: cannot open %s", path);
  unsigned char* buf = NULL;
  long size = -1;
  if (fseek(f, 0, SEEK_END) == 0) size = ftell(f);
  if (size < 0 || fseek(f, 0, SEEK_SET) != 0) {
    fclose(f);
    return BAD("nvk_model_load: cannot read %s", path);
  }
  buf = (unsigned char*)malloc(size ? (size_t)size : 1);
  if (!buf) {
    fclose(f);
    return nvki_fail(NVK_ERR_CUDA, "nvk_model_load: out of host memory for %ld bytes", size);
  }
  size_t got = fread(buf, 1, (size_t)size, f);
  fclose(f);
  nvk_status st = got == (size_t)size ? nvk_model_load_memory(buf, (size_t)size, device, model)
                                      : BAD("nvk_model_load: read %zu of %ld bytes of %s", got, size, path);
  if (st && got == (size_t)size) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s (%s)", nvk_last_error(), path);
    nvki_fail(st, "%s", msg);
  }
  free(buf);
  return st;
}

nvk_status nvk_model_get_info(const nvk_model* m, nvk_model_info* info) {
  if (!m || !info) return BAD("nvk_model_get_info: NULL argument");
  memset(info, 0, sizeof *info);
  info->dtype = m->dt;
  info->n_steps = m->n_steps;
  info->n_classes = m->n_classes;
  info->in_channels = m->in_channels;
  memcpy(info->feature_channels, m->feat_c, sizeof m->feat_c);
  info->has_stage_norms = m->n_norms > 0;
  info->weight_bytes = m->weight_bytes;
  nvki_ok();
  return NVK_OK;
}

/* ------------------------------------------------------------------ the walk */
/* The activations a forward keeps: main (ping-pong slots 0, 1), the NTB branch (2, 3), the ops'
 * scratch (4). Sized by a dry walk of the plan at the input size, which the real walk repeats. */
typedef struct {
  size_t bytes[5], off[5], total;
  int fh[4], fw[4];
} layout_t;

typedef struct {
  const void* p;
  int slot; /* -1: the caller's buffer */
  int h, w, c;
} act_t;

static const nvk_shape_class_t* pick(const classes_t* cl, long long probe) {
  for (int i = 0; i < cl->n; ++i) {
    const nvk_shape_class_t* s = cl->c[i];
    if (probe >= s->probe_lo && (s->probe_hi < 0 || probe <= s->probe_hi)) return s;
  }
  return NULL;
}

static nvk_status no_class(int step, int op, long long probe, const char* what) {
  return nvki_fail(NVK_ERR_UNSUPPORTED, "nvk_model: step %d (%s): no kernel was compiled for %s = %lld", step,
                   op_name(op), what, probe);
}

/* One pass over the plan. cx == NULL: sizes the layout only (and checks the input size runs);
 * else launches, `ws` holding the layout. */
static nvk_status walk(const nvk_model* m, const nvk_ctx_t* cx, const void* x, int layout, void* out,
                       void* const* feats, char* ws, layout_t* L, int batch, int h, int w_, int features,
                       void* stream) {
  size_t es = elem_size(m->dt);
  act_t main_t = {x, -1, h, w_, m->in_channels}, br = {NULL, -1, 0, 0, 0};
  nvk_status st = NVK_OK;
  char* scratch = ws ? ws + L->off[4] : NULL;
  for (int i = 0; i < m->n_steps && !st; ++i) {
    const step_t* s = &m->steps[i];
    const int* k = s->key;
    const act_t* in = s->flags & FROM_BRANCH ? &br : &main_t;
    int oh = in->h, ow = in->w;
    if (s->op == NVK_OP_CONV_BN_RELU) {
      oh = (in->h - 1) / k[2] + 1;
      ow = (in->w - 1) / k[2] + 1;
    } else if (s->op == NVK_OP_PATCH_EMBED) {
      oh = (int)cdiv(in->h, k[2]);
      ow = (int)cdiv(in->w, k[2]);
    }
    int oc = s->op == NVK_OP_MLP ? k[3] : k[1];
    long long pixels = (long long)batch * oh * ow, in_pixels = (long long)batch * in->h * in->w;
    if (pixels > INT32_MAX / 4 || in_pixels > INT32_MAX / 4)
      return nvki_fail(NVK_ERR_UNSUPPORTED, "nvk_model: %d x %d x %d images: step %d's %lld pixels exceed the "
                       "kernels' 32-bit indexing", batch, h, w_, i, in_pixels > pixels ? in_pixels : pixels);
    long long probe = 0;
    if (s->op == NVK_OP_MHCA) probe = in_pixels;
    if (s->op == NVK_OP_E_MHSA) {
      probe = (long long)in->h * in->w / ((long long)k[2] * k[2]);
      if (probe < 1)
        return nvki_fail(NVK_ERR_INVALID, "nvk_model: a %dx%d image is too small: step %d (e_mhsa) sees %dx%d = %d "
                         "tokens, fewer than one %dx%d pooling window", h, w_, i, in->h, in->w, in->h * in->w, k[2],
                         k[2]);
    }
    const nvk_shape_class_t* sc = pick(&s->cls[layout], probe);
    if (!sc) {
      if (!s->cls[layout].n)
        return nvki_fail(NVK_ERR_UNSUPPORTED, "nvk_model: the library has no NCHW-input variant of the stem's conv "
                         "(%d -> %d, stride %d): pass an NHWC image", k[0], k[1], k[2]);
      return no_class(i, s->op, probe, s->op == NVK_OP_MHCA ? "pixels" : "key tokens");
    }
    int stage_end = features && s->stage_end >= 0;
    int direct = stage_end && !m->n_norms; /* the stage output goes straight into the caller's buffer */
    int slot = -1;
    void* dst = direct && feats ? feats[s->stage_end] : NULL; /* a dry walk has no buffers */
    if (!direct) {
      slot = s->flags & TO_BRANCH ? (br.slot == 2 ? 3 : 2) : (main_t.slot == 0 ? 1 : 0);
      size_t bytes = align256((size_t)pixels * (size_t)oc * es);
      if (!cx && bytes > L->bytes[slot]) L->bytes[slot] = bytes;
      dst = ws ? ws + L->off[slot] : NULL;
    }
    size_t need = 0;
    if (s->op == NVK_OP_MHCA) need = nvki_mhca_scratch(sc, in_pixels, k[0], m->dt);
    if (s->op == NVK_OP_MLP) need = nvki_mlp_scratch(sc, in_pixels, k[2], m->dt);
    if (s->op == NVK_OP_E_MHSA) need = nvki_e_mhsa_scratch(sc, batch, in->h, in->w, k[0], k[2], m->dt);
    if (!cx && need > L->bytes[4]) L->bytes[4] = need;
    if (cx) {
      const CUdeviceptr* t = &m->dev[s->t0];
#define T(j) ((const void*)(uintptr_t)t[j])
      switch (s->op) {
        case NVK_OP_CONV_BN_RELU:
          st = nvki_run_conv(cx, sc, in->p, T(0), T(1), dst, batch, in->h, in->w, k[0], k[1], k[2],
                             i == 0 && layout == NVK_NCHW, stream);
          break;
        case NVK_OP_PATCH_EMBED:
          st = nvki_run_patch_embed(cx, sc, in->p, T(0), T(1), dst, batch, in->h, in->w, k[0], k[1], k[2], stream);
          break;
        case NVK_OP_MHCA:
          st = nvki_run_mhca(cx, sc, in->p, T(0), T(1), T(2), dst, scratch, batch, in->h, in->w, k[0], k[1], stream);
          break;
        case NVK_OP_MLP:
          st = nvki_run_mlp(cx, sc, in->p, s->flags & X2_BRANCH ? br.p : NULL, T(0), T(1), T(2), T(3), dst, scratch,
                            batch, in->h, in->w, k[0], k[1], k[2], k[3], stream);
          break;
        default:
          st = nvki_run_e_mhsa(cx, sc, in->p, T(0), T(1), T(2), T(3), T(4), T(5), T(6), T(7), dst, scratch, batch,
                               in->h, in->w, k[0], k[1], k[2], k[3], m->dt, stream);
      }
#undef T
    }
    act_t res = {dst, slot, oh, ow, oc};
    if (s->flags & TO_BRANCH) br = res;
    else main_t = res;
    if (!stage_end) continue;
    int se = s->stage_end;
    L->fh[se] = oh;
    L->fw[se] = ow;
    if (m->n_norms && !st) { /* in line, as the published detection backbone applies them */
      const norm_t* n = &m->norms[se];
      const nvk_shape_class_t* nc = pick(&n->cls, 0);
      if (cx)
        st = nvki_run_patch_embed(cx, nc, main_t.p, (const void*)(uintptr_t)n->w,
                                  (const void*)(uintptr_t)m->dev[n->shift], feats[se], batch, oh, ow, n->c, n->c, 1,
                                  stream);
      main_t.p = feats ? feats[se] : NULL;
      main_t.slot = -1;
    }
  }
  if (st || features || !m->n_classes) return st;
  long long hw = (long long)main_t.h * main_t.w;
  const nvk_shape_class_t* sc = pick(&m->head_cls, hw);
  if (!sc) return no_class(-1, NVK_OP_HEAD, hw, "H*W");
  if (cx)
    st = nvki_run_head(cx, sc, main_t.p, (const void*)(uintptr_t)m->dev[m->head_w],
                       (const void*)(uintptr_t)m->dev[m->head_b], out, batch, main_t.h, main_t.w, m->head_c,
                       m->n_classes, stream);
  return st;
}

static nvk_status plan_layout(const nvk_model* m, int batch, int h, int w_, int features, const char* fn,
                              layout_t* L) {
  memset(L, 0, sizeof *L);
  if (!m) return BAD("%s: model is NULL", fn);
  if (m->ctx && m->generation != nvki_driver_generation()) /* a NVK_NO_DEVICE model holds no driver state */
    return BAD("%s: the CUDA driver was reset (nvk_reset_driver) since this model was loaded: load it again", fn);
  CHK(batch > 0 && h > 0 && w_ > 0, "%s: batch, h, w must be positive, got %d, %d, %d", fn, batch, h, w_);
  CHK(features || m->n_classes, "%s: the model has no head (a backbone): use nvk_model_forward_features", fn);
  nvk_status st = walk(m, NULL, NULL, NVK_NHWC, NULL, NULL, NULL, L, batch, h, w_, features, NULL);
  if (st) return st;
  size_t off = 0;
  for (int i = 0; i < 5; ++i) {
    L->off[i] = off;
    off += align256(L->bytes[i]);
  }
  L->total = off;
  return NVK_OK;
}

size_t nvk_model_workspace_size(const nvk_model* m, int batch, int h, int w_, int features) {
  layout_t L;
  if (plan_layout(m, batch, h, w_, features != 0, "nvk_model_workspace_size", &L)) return 0;
  nvki_ok();
  return L.total;
}

nvk_status nvk_model_output_shape(const nvk_model* m, int batch, int h, int w_, int which, int dims[4], int* ndim) {
  const char* fn = "nvk_model_output_shape";
  if (!dims || !ndim) return BAD("%s: dims and ndim must not be NULL", fn);
  CHK(which >= -1 && which <= 3, "%s: output %d (-1: logits, 0..3: stage features)", fn, which);
  layout_t L;
  nvk_status st = plan_layout(m, batch, h, w_, which >= 0, fn, &L);
  if (st) return st;
  if (which < 0) {
    dims[0] = batch;
    dims[1] = m->n_classes;
    dims[2] = dims[3] = 0;
    *ndim = 2;
  } else {
    dims[0] = batch;
    dims[1] = L.fh[which];
    dims[2] = L.fw[which];
    dims[3] = m->feat_c[which];
    *ndim = 4;
  }
  nvki_ok();
  return NVK_OK;
}

static nvk_status forward(const char* fn, const nvk_model* m, const void* x, nvk_layout layout, void* out,
                          void* const* feats, void* workspace, size_t ws_bytes, int batch, int h, int w_, void* stream) {
  if (!m || !m->ctx)
    return BAD("%s: %s", fn, m ? "the model was loaded with NVK_NO_DEVICE (checked, not uploaded)" : "model is NULL");
  int features = feats != NULL;
  layout_t L;
  nvk_status st = plan_layout(m, batch, h, w_, features, fn, &L);
  if (st) return st;
  CHK(layout == NVK_NCHW || layout == NVK_NHWC, "%s: layout %d (NVK_NCHW 0, NVK_NHWC 1)", fn, (int)layout);
  const char* op = fn + 4; /* PTR's messages say "nvk_<op>" */
  PTR(op, x);
  if (features)
    for (int s = 0; s < 4; ++s) {
      const void* f = feats[s];
      CHK(f, "%s: features[%d] is NULL", fn, s);
      PTR(op, f);
    }
  else
    PTR(op, out);
  CHK(ws_bytes >= L.total, "%s: the workspace has %zu bytes, a %d x %d x %d forward needs %zu "
      "(nvk_model_workspace_size)", fn, ws_bytes, batch, h, w_, L.total);
  if (L.total) PTR(op, workspace);
  /* O(1) in the weights: they are on the model's device since load; only the caller's buffers
   * are asked about */
  const nvk_dptr_t dp[] = {DEV(x), {"out", features ? NULL : out}, {"features[0]", features ? feats[0] : NULL},
                           {"features[1]", features ? feats[1] : NULL}, {"features[2]", features ? feats[2] : NULL},
                           {"features[3]", features ? feats[3] : NULL}, {"workspace", L.total ? workspace : NULL}};
  /* A default stream (NULL, legacy, per-thread) is the model's context's: made current for the
   * call when another one is, so no front has to set the current device. */
  int pushed = 0;
  if (!stream || (uintptr_t)stream == CU_STREAM_LEGACY || (uintptr_t)stream == CU_STREAM_PER_THREAD) {
    CUcontext cur = NULL;
    CUresult r = nvki_drv.cuCtxGetCurrent(&cur);
    if (r != CUDA_SUCCESS) return nvki_cu_fail(r, "cuCtxGetCurrent");
    if (cur != m->ctx) {
      if ((r = nvki_drv.cuCtxPushCurrent(m->ctx)) != CUDA_SUCCESS) return nvki_cu_fail(r, "cuCtxPushCurrent");
      pushed = 1;
    }
  }
  nvk_call_t call;
  st = nvki_enter(op, stream, dp, NDEV(dp), &call);
  if (!st) {
    if (call.c->ctx != m->ctx)
      st = BAD("%s: the stream belongs to another context than the model's (device %d's primary context)", fn,
               m->device);
    else
      st = walk(m, call.c, x, layout, out, feats, (char*)workspace, &L, batch, h, w_, features, stream);
    st = nvki_leave(&call, st);
  }
  if (pushed) {
    CUcontext popped;
    CUresult r = nvki_drv.cuCtxPopCurrent(&popped);
    if (r != CUDA_SUCCESS && !st) st = nvki_cu_fail(r, "cuCtxPopCurrent");
  }
  return st;
}

nvk_status nvk_model_forward(const nvk_model* m, const void* x, nvk_layout layout, void* out, void* workspace,
                             size_t workspace_bytes, int batch, int h, int w_, void* stream) {
  return forward("nvk_model_forward", m, x, layout, out, NULL, workspace, workspace_bytes, batch, h, w_, stream);
}

nvk_status nvk_model_forward_features(const nvk_model* m, const void* x, nvk_layout layout, void* const features[4],
                                      void* workspace, size_t workspace_bytes, int batch, int h, int w_,
                                      void* stream) {
  if (!features) return BAD("nvk_model_forward_features: features is NULL");
  return forward("nvk_model_forward_features", m, x, layout, NULL, features, workspace, workspace_bytes, batch, h, w_,
                 stream);
}
