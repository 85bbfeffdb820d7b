/* nextvit_kernels C library: shape-class lookup in the AOT tables + CUDA driver API launches.
 *
 * libcuda.so.1 is opened with dlopen on first use, so the library loads (and reports
 * NVK_ERR_NO_DRIVER) on machines without a GPU driver. Modules are loaded once per CUcontext
 * (all kernels at once, under a mutex), so launches after the first call in a context do no
 * module loading and are CUDA-graph capturable. A call runs in its stream's context (pushed for
 * the call when another one is current) and refuses device pointers of another device. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "nvk_internal.h"

#ifndef NVK_VERSION_STRING
#define NVK_VERSION_STRING "0.1.0"
#endif

nvk_driver_t nvki_drv;
static int g_drv_state = 0; /* 0: not tried, 1: ok, -1: failed */
static void* g_drv_handle;
static unsigned g_drv_generation; /* counts nvk_reset_driver calls */
static char g_drv_error[512];
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

/* ------------------------------------------------------------------ errors */
static __thread char t_error[1024];

const char* nvk_last_error(void) { return t_error; }

static char g_version[512];
static void init_version(void) {
  snprintf(g_version, sizeof g_version, "nextvit_kernels " NVK_VERSION_STRING " (%s)", nvk_aot_info);
}

const char* nvk_version(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, init_version);
  return g_version;
}

const char* nvk_manifest(void) { return nvk_manifest_json; }

nvk_status nvki_fail(nvk_status st, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(t_error, sizeof t_error, fmt, ap);
  va_end(ap);
  return st;
}

nvk_status nvki_cu_fail(CUresult r, const char* what) {
  const char* s = NULL;
  if (nvki_drv.cuGetErrorString) nvki_drv.cuGetErrorString(r, &s);
  return nvki_fail(NVK_ERR_CUDA, "%s failed: CUDA error %d (%s)", what, (int)r, s ? s : "?");
}

void nvki_ok(void) { t_error[0] = 0; }

/* ------------------------------------------------------------------ driver loading */
/* NEXTVIT_CUDA_DRIVER names the driver library to open instead of libcuda.so.1 (nothing else is
 * tried then): the CPU stand-in of nextvit_kernels.testing. An override of the library search
 * path would also reach torch's own dlopen of libcuda; this variable reaches only this library. */
#define DRIVER_ENV "NEXTVIT_CUDA_DRIVER"

static int load_driver_locked(void) {
  if (g_drv_state) return g_drv_state;
  const char* override = getenv(DRIVER_ENV);
  const char* names[] = {"libcuda.so.1", "libcuda.so"};
  size_t n_names = sizeof names / sizeof *names;
  if (override && *override) {
    names[0] = override;
    n_names = 1;
  }
  void* h = NULL;
  for (size_t i = 0; i < n_names && !h; ++i) h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* e = dlerror();
    snprintf(g_drv_error, sizeof g_drv_error,
             "no CUDA driver: dlopen(%s) failed (%s)%s", names[0], e ? e : "not found",
             override && *override ? " (named by " DRIVER_ENV ")"
                                   : "; a GPU and its driver are needed to launch kernels");
    g_drv_state = -1;
    return -1;
  }
  g_drv_handle = h;
#define SYM(name, ver)                                                                              \
  do {                                                                                              \
    void* p = NULL;                                                                                 \
    if (*ver) p = dlsym(h, #name ver);                                                              \
    if (!p) p = dlsym(h, #name);                                                                    \
    if (!p) {                                                                                       \
      snprintf(g_drv_error, sizeof g_drv_error, "CUDA driver lacks %s", #name);                     \
      g_drv_state = -1;                                                                             \
      return -1;                                                                                    \
    }                                                                                               \
    memcpy(&nvki_drv.name, &p, sizeof p);                                                              \
  } while (0)
  SYM(cuInit, "");
  SYM(cuDriverGetVersion, "");
  SYM(cuCtxGetCurrent, "");
  SYM(cuCtxSetCurrent, "");
  SYM(cuCtxGetDevice, "");
  SYM(cuCtxPushCurrent, "_v2");
  SYM(cuCtxPopCurrent, "_v2");
  SYM(cuStreamGetCtx, "");
  SYM(cuDeviceGet, "");
  SYM(cuDevicePrimaryCtxRetain, "");
  SYM(cuDeviceGetAttribute, "");
  SYM(cuModuleLoadData, "");
  SYM(cuModuleGetFunction, "");
  SYM(cuFuncSetAttribute, "");
  SYM(cuFuncGetAttribute, "");
  SYM(cuLaunchKernel, "");
  SYM(cuPointerGetAttribute, "");
  SYM(cuGetErrorString, "");
  SYM(cuMemAlloc, "_v2");
  SYM(cuMemFree, "_v2");
  SYM(cuMemcpyHtoD, "_v2");
#undef SYM
  CUresult r = nvki_drv.cuInit(0);
  if (r != CUDA_SUCCESS) {
    const char* s = NULL;
    nvki_drv.cuGetErrorString(r, &s);
    snprintf(g_drv_error, sizeof g_drv_error, "no usable CUDA device: cuInit failed with error %d (%s)", (int)r,
             s ? s : "?");
    g_drv_state = -1;
    return -1;
  }
  g_drv_state = 1;
  return 1;
}

/* ------------------------------------------------------------------ per-context modules */
static nvk_ctx_t* g_ctxs = NULL;

static nvk_status load_modules(CUcontext ctx, nvk_ctx_t** out);

nvk_status nvki_leave(nvk_call_t* call, nvk_status st) {
  if (call->pushed) {
    CUcontext popped;
    CUresult r = nvki_drv.cuCtxPopCurrent(&popped);
    call->pushed = 0;
    if (r != CUDA_SUCCESS && st == NVK_OK) st = nvki_cu_fail(r, "cuCtxPopCurrent");
  }
  if (st == NVK_OK) nvki_ok();
  return st;
}

/* The context of a call: the stream's (cuStreamGetCtx), pushed for the duration of the call when
 * it is not the current one, so that a cuda:1 stream launches on device 1 whatever the caller has
 * current, and the caller's current context is unchanged afterwards. The NULL / legacy /
 * per-thread default streams have no context of their own: they launch in the current context,
 * else (like the runtime API) in device 0's primary context, which is then made current.
 * Push/pop and the lookup are capturable; a context's first call loads the modules and is not. */
nvk_status nvki_get_context(void* stream, nvk_call_t* call) {
  call->c = NULL;
  call->pushed = 0;
  call->default_stream = !stream || (uintptr_t)stream == CU_STREAM_LEGACY || (uintptr_t)stream == CU_STREAM_PER_THREAD;
  pthread_mutex_lock(&g_lock);
  int st = load_driver_locked();
  pthread_mutex_unlock(&g_lock);
  if (st < 0) return nvki_fail(NVK_ERR_NO_DRIVER, "%s", g_drv_error);
  CUcontext cur = NULL, ctx = NULL;
  CUresult r = nvki_drv.cuCtxGetCurrent(&cur);
  if (r != CUDA_SUCCESS) return nvki_cu_fail(r, "cuCtxGetCurrent");
  if (!call->default_stream) {
    if ((r = nvki_drv.cuStreamGetCtx((CUstream)stream, &ctx)) != CUDA_SUCCESS) return nvki_cu_fail(r, "cuStreamGetCtx");
    if (ctx != cur) {
      if ((r = nvki_drv.cuCtxPushCurrent(ctx)) != CUDA_SUCCESS) return nvki_cu_fail(r, "cuCtxPushCurrent");
      call->pushed = 1;
    }
  } else if (cur) {
    ctx = cur;
  } else {
    CUdevice d;
    if ((r = nvki_drv.cuDeviceGet(&d, 0)) != CUDA_SUCCESS) return nvki_cu_fail(r, "cuDeviceGet");
    if ((r = nvki_drv.cuDevicePrimaryCtxRetain(&ctx, d)) != CUDA_SUCCESS) return nvki_cu_fail(r, "cuDevicePrimaryCtxRetain");
    if ((r = nvki_drv.cuCtxSetCurrent(ctx)) != CUDA_SUCCESS) return nvki_cu_fail(r, "cuCtxSetCurrent");
  }
  nvk_status ret = load_modules(ctx, &call->c);
  return ret ? nvki_leave(call, ret) : NVK_OK;
}


/* get_context + every device pointer of the call on the context's device. One
 * cuPointerGetAttribute per pointer per call (host-side, capturable; Triton's own launcher
 * makes the same query for every pointer argument of every launch): a pointer of another
 * device would otherwise fault (a sticky error that ruins the context) or read over peer access. */
nvk_status nvki_enter(const char* op, void* stream, const nvk_dptr_t* ptrs, int n, nvk_call_t* call) {
  nvk_status st = nvki_get_context(stream, call);
  if (st) return st;
  for (int i = 0; i < n; ++i) {
    if (!ptrs[i].p) continue;
    int ordinal = -1;
    CUresult r = nvki_drv.cuPointerGetAttribute(&ordinal, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                                             (CUdeviceptr)(uintptr_t)ptrs[i].p);
    if (r != CUDA_SUCCESS) {
      const char* s = NULL;
      nvki_drv.cuGetErrorString(r, &s);
      return nvki_leave(call, nvki_fail(NVK_ERR_INVALID, "nvk_%s: %s = %p is not memory the CUDA driver knows "
                              "(cuPointerGetAttribute: CUDA error %d (%s)); pass device pointers",
                              op, ptrs[i].name, ptrs[i].p, (int)r, s ? s : "?"));
    }
    if (ordinal != (int)call->c->dev)
      return nvki_leave(call, nvki_fail(NVK_ERR_INVALID, "nvk_%s: %s is on device %d but %s device %d", op, ptrs[i].name,
                              ordinal, call->default_stream ? "the default stream runs in the current context, on"
                                                            : "the stream belongs to",
                              (int)call->c->dev));
  }
  return NVK_OK;
}

/* The modules of `ctx` (current here), loaded on its first use. */
static nvk_status load_modules(CUcontext ctx, nvk_ctx_t** out) {
  CUresult r;
  pthread_mutex_lock(&g_lock);
  for (nvk_ctx_t* c = g_ctxs; c; c = c->next)
    if (c->ctx == ctx) {
      pthread_mutex_unlock(&g_lock);
      *out = c;
      return NVK_OK;
    }
  /* First use in this context: load every kernel (so later calls can be graph-captured). */
  nvk_status ret = NVK_OK;
  nvk_ctx_t* c = (nvk_ctx_t*)calloc(1, sizeof *c);
  nvk_loaded_t* ks = (nvk_loaded_t*)calloc((size_t)(nvk_num_kernels > 0 ? nvk_num_kernels : 1), sizeof *ks);
  CUdevice dev;
  int major = 0, minor = 0, optin = 0;
  if (!c || !ks) {
    ret = nvki_fail(NVK_ERR_CUDA, "out of host memory");
    goto done;
  }
  if ((r = nvki_drv.cuCtxGetDevice(&dev)) != CUDA_SUCCESS) { ret = nvki_cu_fail(r, "cuCtxGetDevice"); goto done; }
  nvki_drv.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
  nvki_drv.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
  nvki_drv.cuDeviceGetAttribute(&optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev);
  c->ctx = ctx;
  c->dev = dev;
  c->cc = major * 10 + minor;
  c->shared_optin = optin;
  c->k = ks;
  if (c->cc < 80) {
    ret = nvki_fail(NVK_ERR_UNSUPPORTED, "GPU compute capability %d.%d: the kernels need sm_80 or newer", major, minor);
    goto done;
  }
  for (int i = 0; i < nvk_num_kernels; ++i) {
    const nvk_kernel_t* kd = &nvk_kernels[i];
    const void* image = NULL;
    unsigned shared = 0;
    if (c->cc == 90 && kd->cubin90) {
      image = kd->cubin90;
      shared = kd->shared90;
    } else if (major == 8 && kd->cubin80) { /* sm_80 SASS runs on every 8.x */
      image = kd->cubin80;
      shared = kd->shared80;
    } else if (kd->ptx80) { /* driver JIT of the sm_80 PTX (forward compatible) */
      image = kd->ptx80;
      shared = kd->shared80;
    }
    CUmodule mod = NULL;
    if (!image) {
      ks[i].err = -1;
      continue;
    }
    r = nvki_drv.cuModuleLoadData(&mod, image);
    if (r == CUDA_SUCCESS) r = nvki_drv.cuModuleGetFunction(&ks[i].fn, mod, kd->symbol);
    ks[i].err = r;
    ks[i].shared = (int)shared;
    ks[i].shared_ok = 1;
    if (r == CUDA_SUCCESS && shared > 49152) {
      int stat = 0;
      nvki_drv.cuFuncGetAttribute(&stat, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, ks[i].fn);
      if ((int)shared + stat > optin ||
          nvki_drv.cuFuncSetAttribute(ks[i].fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, (int)shared) !=
              CUDA_SUCCESS)
        ks[i].shared_ok = 0;
    }
  }
  c->next = g_ctxs;
  g_ctxs = c;
  *out = c;
  c = NULL;
  ks = NULL;
done:
  pthread_mutex_unlock(&g_lock);
  free(ks);
  free(c);
  return ret;
}

nvk_status nvki_enter_device(int device, nvk_call_t* call) {
  call->c = NULL;
  call->pushed = 0;
  call->default_stream = 0;
  pthread_mutex_lock(&g_lock);
  int st = load_driver_locked();
  pthread_mutex_unlock(&g_lock);
  if (st < 0) return nvki_fail(NVK_ERR_NO_DRIVER, "%s", g_drv_error);
  CUdevice d;
  CUcontext ctx;
  CUresult r;
  if ((r = nvki_drv.cuDeviceGet(&d, device)) != CUDA_SUCCESS) return nvki_cu_fail(r, "cuDeviceGet");
  if ((r = nvki_drv.cuDevicePrimaryCtxRetain(&ctx, d)) != CUDA_SUCCESS) return nvki_cu_fail(r, "cuDevicePrimaryCtxRetain");
  if ((r = nvki_drv.cuCtxPushCurrent(ctx)) != CUDA_SUCCESS) return nvki_cu_fail(r, "cuCtxPushCurrent");
  call->pushed = 1;
  nvk_status ret = load_modules(ctx, &call->c);
  return ret ? nvki_leave(call, ret) : NVK_OK;
}

unsigned nvki_driver_generation(void) {
  pthread_mutex_lock(&g_lock);
  unsigned g = g_drv_generation;
  pthread_mutex_unlock(&g_lock);
  return g;
}

nvk_status nvk_reset_driver(void) {
  pthread_mutex_lock(&g_lock);
  while (g_ctxs) {
    nvk_ctx_t* c = g_ctxs;
    g_ctxs = c->next;
    free(c->k);
    free(c);
  }
  memset(&nvki_drv, 0, sizeof nvki_drv);
  g_drv_state = 0;
  ++g_drv_generation;
  if (g_drv_handle) dlclose(g_drv_handle);
  g_drv_handle = NULL;
  pthread_mutex_unlock(&g_lock);
  nvki_ok();
  return NVK_OK;
}

/* ------------------------------------------------------------------ lookup + launch */
const char* const nvki_op_names[NVK_NUM_OPS] = {"conv_bn_relu", "patch_embed", "mhca", "mlp", "e_mhsa", "head"};
const char* const nvki_dt_names[3] = {"fp32", "fp16", "bf16"};

const nvk_shape_class_t* nvki_lookup(int op, int dt, const int* key, int nkey, long long probe) {
  for (int i = 0; i < nvk_num_shape_classes; ++i) {
    const nvk_shape_class_t* s = &nvk_shape_classes[i];
    if (s->op != op || s->dtype != dt) continue;
    int same = 1;
    for (int j = 0; j < nkey; ++j) same &= s->key[j] == key[j];
    if (!same) continue;
    if (probe >= 0 && (probe < s->probe_lo || (s->probe_hi >= 0 && probe > s->probe_hi))) continue;
    return s;
  }
  return NULL;
}

nvk_status nvki_unsupported(int op, int dt, const int* key, int nkey, const char* key_desc) {
  char buf[256];
  int n = 0;
  buf[0] = 0;
  for (int j = 0; j < nkey && n < (int)sizeof buf - 16; ++j) n += snprintf(buf + n, sizeof buf - n, j ? ", %d" : "%d", key[j]);
  return nvki_fail(NVK_ERR_UNSUPPORTED,
              "nvk_%s: no kernel was compiled ahead of time for %s with (%s) = (%s); the library holds the "
              "shapes of the Next-ViT variants it was built for (%s): rebuild it with an AOT output that "
              "covers this shape",
              nvki_op_names[op], nvki_dt_names[dt], key_desc, buf, nvk_aot_info);
}

/* One runtime argument of the full (unspecialized) list, in the launcher's order. */
typedef struct {
  char kind; /* 'p' pointer, 'i' i32, 'f' f32 */
  union {
    CUdeviceptr p;
    int32_t i;
    float f;
  } v;
} nvk_arg_t;

typedef struct {
  nvk_arg_t a[NVK_MAX_ARGS];
  int n;
  int overflow; /* an i32 argument did not fit */
} nvk_args_t;

static void arg_p(nvk_args_t* A, const void* p) {
  A->a[A->n].kind = 'p';
  A->a[A->n++].v.p = (CUdeviceptr)(uintptr_t)p;
}
static void arg_i(nvk_args_t* A, long long v) {
  if (v > INT32_MAX || v < INT32_MIN) A->overflow = 1;
  A->a[A->n].kind = 'i';
  A->a[A->n++].v.i = (int32_t)v;
}
static void arg_f(nvk_args_t* A, float f) {
  A->a[A->n].kind = 'f';
  A->a[A->n++].v.f = f;
}

static nvk_status launch(const nvk_ctx_t* c, int op, int kidx, const nvk_args_t* A, long long gx, long long gy,
                         long long gz, void* stream) {
  const nvk_kernel_t* kd = &nvk_kernels[kidx];
  const nvk_loaded_t* lk = &c->k[kidx];
  if (A->overflow)
    return nvki_fail(NVK_ERR_UNSUPPORTED, "nvk_%s: an index/size argument exceeds 32 bits (the kernels take i32)",
                nvki_op_names[op]);
  if (A->n != kd->n_full)
    return nvki_fail(NVK_ERR_INVALID, "nvk_%s: internal error: %d arguments built, the kernel table says %d",
                nvki_op_names[op], A->n, kd->n_full);
  if (lk->err == -1)
    return nvki_fail(NVK_ERR_UNSUPPORTED, "nvk_%s: kernel %s has no image for compute capability %d", nvki_op_names[op],
                kd->id, c->cc);
  if (lk->err != CUDA_SUCCESS) return nvki_cu_fail(lk->err, "cuModuleLoadData/cuModuleGetFunction");
  if (!lk->shared_ok)
    return nvki_fail(NVK_ERR_UNSUPPORTED, "nvk_%s: kernel %s needs %d bytes of shared memory, the device allows %d",
                nvki_op_names[op], kd->id, lk->shared, c->shared_optin);
  if (gx <= 0 || gy <= 0 || gz <= 0) return NVK_OK; /* nothing to do */
  if (gx > 2147483647LL || gy > 65535 || gz > 65535)
    return nvki_fail(NVK_ERR_UNSUPPORTED, "nvk_%s: grid (%lld, %lld, %lld) exceeds the CUDA limits", nvki_op_names[op], gx,
                gy, gz);
  void* params[NVK_MAX_ARGS + 4];
  int np = 0;
  for (int i = 0; i < A->n; ++i)
    if (kd->passed_mask >> i & 1) params[np++] = (void*)&A->a[i].v;
  static const CUdeviceptr null_ptr = 0;
  for (int i = 0; i < kd->n_hidden; ++i) params[np++] = (void*)&null_ptr; /* global/profile scratch: none */
  if (np != kd->n_params + kd->n_hidden)
    return nvki_fail(NVK_ERR_INVALID, "nvk_%s: internal error: parameter count mismatch for %s", nvki_op_names[op], kd->id);
  /* A driver reads only the kernel's own count; the terminator lets the CPU stand-in
   * (nextvit_kernels.testing) check that count. */
  params[np] = NULL;
  CUresult r = nvki_drv.cuLaunchKernel(lk->fn, (unsigned)gx, (unsigned)gy, (unsigned)gz, 32u * (unsigned)kd->num_warps,
                                    1, 1, (unsigned)lk->shared, (CUstream)stream, params, NULL);
  if (r != CUDA_SUCCESS) return nvki_cu_fail(r, "cuLaunchKernel");
  return NVK_OK;
}


nvk_status nvk_load(void* stream) {
  nvk_call_t call;
  nvk_status st = nvki_get_context(stream, &call);
  return st ? st : nvki_leave(&call, NVK_OK);
}

/* ------------------------------------------------------------------ op launches
 * nvki_run_*: one op on arguments already checked, with its shape class resolved, in the call's
 * context (the per-op entry points below check and resolve; nvk_model.c resolves at load). */
nvk_status nvki_run_conv(const nvk_ctx_t* cx, const nvk_shape_class_t* sc, const void* x, const void* w,
                         const void* b, void* out, int batch, int h, int w_, int c_in, int c_out, int stride,
                         int nchw, void* stream) {
  long long ho = (h - 1) / stride + 1, wo = (w_ - 1) / stride + 1, m = (long long)batch * ho * wo;
  nvk_args_t A = {0};
  arg_p(&A, x); arg_p(&A, w); arg_p(&A, b); arg_p(&A, out);
  arg_i(&A, m); arg_i(&A, h); arg_i(&A, w_); arg_i(&A, ho); arg_i(&A, wo); arg_i(&A, c_in); arg_i(&A, c_out);
  if (nchw) { /* the stem's input as image preprocessing gives it: no transpose kernel */
    arg_i(&A, (long long)c_in * h * w_); arg_i(&A, (long long)h * w_); arg_i(&A, w_); arg_i(&A, 1);
  } else {
    arg_i(&A, (long long)h * w_ * c_in); arg_i(&A, 1); arg_i(&A, (long long)w_ * c_in); arg_i(&A, c_in);
  }
  arg_i(&A, (long long)c_in * 9); arg_i(&A, 9); arg_i(&A, 3); arg_i(&A, 1);
  arg_i(&A, 1);
  arg_i(&A, ho * wo * c_out); arg_i(&A, 1); arg_i(&A, wo * c_out); arg_i(&A, c_out);
  return launch(cx, NVK_OP_CONV_BN_RELU, sc->kernels[0], &A, cdiv(m, sc->consts[0]) * cdiv(c_out, sc->consts[1]),
                1, 1, stream);
}

nvk_status nvki_run_patch_embed(const nvk_ctx_t* cx, const nvk_shape_class_t* sc, const void* x, const void* w,
                                const void* b, void* out, int batch, int h, int w_, int c_in, int c_out, int stride,
                                void* stream) {
  long long oh = cdiv(h, stride), ow = cdiv(w_, stride), m = (long long)batch * oh * ow;
  nvk_args_t A = {0};
  arg_p(&A, x); arg_p(&A, w); arg_p(&A, b); arg_p(&A, out);
  arg_i(&A, m); arg_i(&A, h); arg_i(&A, w_); arg_i(&A, oh); arg_i(&A, ow); arg_i(&A, c_in); arg_i(&A, c_out);
  return launch(cx, NVK_OP_PATCH_EMBED, sc->kernels[0], &A, cdiv(m, sc->consts[0]), cdiv(c_out, sc->consts[1]), 1,
                stream);
}

/* The second GEMM of the ops that run split (ops/mlp.py gemm_from_scratch): out = h @ w^T
 * (+ bias) (+ x), rows x c -> rows x c_out, with the MLP's fc2 kernel (class kernel `kidx`).
 * x2 and the fc1 weight/bias are not read there, nor the bias when NULL (HAS_B2 is compiled
 * in): dummies. */
static nvk_status launch_scratch_gemm(const nvk_ctx_t* cx, int op, int kidx, const void* x, const void* h,
                                      const void* w, const void* bias, void* out, long long rows, int c, int c_out,
                                      int block_m, int block_n, void* stream) {
  nvk_args_t A = {0};
  arg_p(&A, x); arg_p(&A, x); arg_p(&A, w); arg_p(&A, w); arg_p(&A, w); arg_p(&A, bias ? bias : w);
  arg_p(&A, h); arg_p(&A, out);
  arg_i(&A, rows); arg_i(&A, c); arg_i(&A, 0); arg_i(&A, c); arg_i(&A, c_out);
  return launch(cx, op, kidx, &A, cdiv(rows, block_m), cdiv(c_out, block_n), 1, stream);
}

size_t nvki_mhca_scratch(const nvk_shape_class_t* sc, long long pixels, int c, nvk_dtype dt) {
  return sc->n_kernels == 2 ? align256((size_t)pixels * (size_t)c * elem_size(dt)) : 0; /* [pixels, c] */
}

nvk_status nvki_run_mhca(const nvk_ctx_t* cx, const nvk_shape_class_t* sc, const void* x, const void* conv_w,
                         const void* conv_b, const void* proj_w, void* out, void* workspace, int batch, int h, int w_,
                         int c, int c_out, void* stream) {
  long long m = (long long)batch * h * w_;
  if (sc->n_kernels == 2) { /* few pixels: conv kernel over (pixel tile, head), then a GEMM */
    nvk_args_t A = {0};
    arg_p(&A, x); arg_p(&A, conv_w); arg_p(&A, conv_b); arg_p(&A, workspace);
    arg_i(&A, m); arg_i(&A, h); arg_i(&A, w_); arg_i(&A, c);
    arg_i(&A, (long long)h * w_ * c); arg_i(&A, 1); arg_i(&A, (long long)w_ * c); arg_i(&A, c);
    arg_i(&A, 32 * 9); arg_i(&A, 9); arg_i(&A, 3); arg_i(&A, 1); arg_i(&A, 1);
    nvk_status st = launch(cx, NVK_OP_MHCA, sc->kernels[0], &A, cdiv(m, sc->consts[2]), c / 32, 1, stream);
    if (st) return st;
    return launch_scratch_gemm(cx, NVK_OP_MHCA, sc->kernels[1], x, workspace, proj_w, NULL, out, m, c, c_out,
                               sc->consts[3], sc->consts[4], stream);
  }
  nvk_args_t A = {0};
  arg_p(&A, x); arg_p(&A, conv_w); arg_p(&A, conv_b); arg_p(&A, proj_w); arg_p(&A, out);
  arg_i(&A, m); arg_i(&A, h); arg_i(&A, w_); arg_i(&A, c); arg_i(&A, c_out);
  arg_i(&A, (long long)h * w_ * c); arg_i(&A, 1); arg_i(&A, (long long)w_ * c); arg_i(&A, c);
  arg_i(&A, 32 * 9); arg_i(&A, 9); arg_i(&A, 3); arg_i(&A, 1);
  arg_i(&A, 1); arg_i(&A, c); arg_i(&A, 1);
  arg_i(&A, (long long)h * w_ * c_out); arg_i(&A, 1); arg_i(&A, (long long)w_ * c_out); arg_i(&A, c_out);
  return launch(cx, NVK_OP_MHCA, sc->kernels[0], &A, cdiv(m, sc->consts[0]) * cdiv(c_out, sc->consts[1]), 1, 1,
                stream);
}

size_t nvki_mlp_scratch(const nvk_shape_class_t* sc, long long pixels, int hidden, nvk_dtype dt) {
  /* fused: the hidden activation never leaves the chip; split: [pixels, hidden] */
  return sc->n_kernels == 2 ? align256((size_t)pixels * (size_t)hidden * elem_size(dt)) : 0;
}

nvk_status nvki_run_mlp(const nvk_ctx_t* cx, const nvk_shape_class_t* sc, const void* x, const void* x2,
                        const void* fc1_w, const void* fc1_b, const void* fc2_w, const void* fc2_b, void* out,
                        void* workspace, int batch, int h, int w_, int c1, int c2, int hidden, int c_out,
                        void* stream) {
  int split = sc->n_kernels == 2; /* fc1 -> workspace, then fc2 (outputs wider than one N tile) */
  long long m = (long long)batch * h * w_;
  const void* h_buf = split ? workspace : x; /* fused: an unused dummy pointer */
  if (split) {
    nvk_args_t F = {0};
    arg_p(&F, x); arg_p(&F, x2 ? x2 : x); arg_p(&F, fc1_w); arg_p(&F, fc1_b); arg_p(&F, h_buf);
    arg_i(&F, m); arg_i(&F, c1); arg_i(&F, c2); arg_i(&F, hidden);
    nvk_status st = launch(cx, NVK_OP_MLP, sc->kernels[0], &F, cdiv(m, sc->consts[2]), cdiv(hidden, sc->consts[3]),
                           1, stream);
    if (st) return st;
  }
  nvk_args_t A = {0};
  arg_p(&A, x); arg_p(&A, x2 ? x2 : x); arg_p(&A, fc1_w); arg_p(&A, fc1_b); arg_p(&A, fc2_w); arg_p(&A, fc2_b);
  arg_p(&A, h_buf); arg_p(&A, out);
  arg_i(&A, m); arg_i(&A, c1); arg_i(&A, c2); arg_i(&A, hidden); arg_i(&A, c_out);
  return launch(cx, NVK_OP_MLP, sc->kernels[split], &A, cdiv(m, sc->consts[0]), cdiv(c_out, sc->consts[1]), 1,
                stream);
}

/* Workspace layout: [B, Nk, 2C] k|v, then (sr > 1) [B, Nk, C] pooled tokens, then (split
 * classes: three kernels) the [B*N, C] attention output; each part 256-byte aligned. */
static size_t e_mhsa_parts(const nvk_shape_class_t* sc, long long batch, long long n, long long nk, int c,
                           int sr_ratio, nvk_dtype dt, size_t* pooled_off, size_t* o_off) {
  size_t es = elem_size(dt);
  size_t kv = align256((size_t)batch * (size_t)nk * 2 * (size_t)c * es);
  size_t pooled = sr_ratio > 1 ? align256((size_t)batch * (size_t)nk * (size_t)c * es) : 0;
  size_t o = sc->n_kernels == 3 ? align256((size_t)batch * (size_t)n * (size_t)c * es) : 0;
  *pooled_off = kv;
  *o_off = kv + pooled;
  return kv + pooled + o;
}

size_t nvki_e_mhsa_scratch(const nvk_shape_class_t* sc, int batch, int h, int w_, int c, int sr_ratio, nvk_dtype dt) {
  long long n = (long long)h * w_;
  size_t a, b;
  return e_mhsa_parts(sc, batch, n, n / ((long long)sr_ratio * sr_ratio), c, sr_ratio, dt, &a, &b);
}

nvk_status nvki_run_e_mhsa(const nvk_ctx_t* cx, const nvk_shape_class_t* sc, const void* x, const void* q_w,
                           const void* q_b, const void* k_w, const void* k_b, const void* v_w, const void* v_b,
                           const void* proj_w, const void* proj_b, void* out, void* workspace, int batch, int h,
                           int w_, int c, int c_out, int sr_ratio, int head_dim, nvk_dtype dt, void* stream) {
  long long n = (long long)h * w_, r = (long long)sr_ratio * sr_ratio, nk = n / r;
  size_t pooled_off, o_off;
  e_mhsa_parts(sc, batch, n, nk, c, sr_ratio, dt, &pooled_off, &o_off);
  char* kv = (char*)workspace;
  char* pooled = r > 1 ? kv + pooled_off : kv;
  long long rows = (long long)batch * nk;
  float scale = (float)pow((double)head_dim, -0.5); /* what the JIT passes: float(head_dim) ** -0.5 as fp32 */
  nvk_args_t A = {0};
  arg_p(&A, x); arg_p(&A, pooled); arg_p(&A, k_w); arg_p(&A, k_b); arg_p(&A, v_w); arg_p(&A, v_b); arg_p(&A, kv);
  arg_i(&A, n); arg_i(&A, c); arg_i(&A, nk); arg_i(&A, r); arg_i(&A, rows);
  nvk_status st = launch(cx, NVK_OP_E_MHSA, sc->kernels[0], &A, cdiv(rows, sc->consts[0]), 1, 1, stream);
  if (st) return st;
  if (sc->n_kernels == 3) { /* split: per-(query tile, head) attention into the workspace, then a GEMM */
    char* o = kv + o_off;
    nvk_args_t H = {0};
    arg_p(&H, x); arg_p(&H, kv); arg_p(&H, q_w); arg_p(&H, q_b); arg_p(&H, o);
    arg_i(&H, n); arg_i(&H, c); arg_i(&H, nk); arg_f(&H, scale);
    st = launch(cx, NVK_OP_E_MHSA, sc->kernels[1], &H, (long long)batch * cdiv(n, sc->consts[3]), c / head_dim, 1,
                stream);
    if (st) return st;
    return launch_scratch_gemm(cx, NVK_OP_E_MHSA, sc->kernels[2], x, o, proj_w, proj_b, out, (long long)batch * n, c,
                               c_out, sc->consts[4], sc->consts[5], stream);
  }
  nvk_args_t B = {0};
  arg_p(&B, x); arg_p(&B, kv); arg_p(&B, q_w); arg_p(&B, q_b); arg_p(&B, proj_w); arg_p(&B, proj_b); arg_p(&B, out);
  arg_i(&B, n); arg_i(&B, c); arg_i(&B, c_out); arg_i(&B, nk); arg_i(&B, c / head_dim);
  arg_f(&B, scale);
  return launch(cx, NVK_OP_E_MHSA, sc->kernels[1], &B, (long long)batch * cdiv(n, sc->consts[1]),
                cdiv(c_out, sc->consts[2]), 1, stream);
}

nvk_status nvki_run_head(const nvk_ctx_t* cx, const nvk_shape_class_t* sc, const void* x, const void* w,
                         const void* b, void* out, int batch, int h, int w_, int c, int n_classes, void* stream) {
  long long hw = (long long)h * w_;
  nvk_args_t A = {0};
  arg_p(&A, x); arg_p(&A, w); arg_p(&A, b); arg_p(&A, out);
  arg_i(&A, hw); arg_i(&A, c); arg_i(&A, n_classes);
  arg_i(&A, hw * c); arg_i(&A, 1); arg_i(&A, c);
  arg_i(&A, c); arg_i(&A, 1); arg_i(&A, n_classes); arg_i(&A, 1);
  return launch(cx, NVK_OP_HEAD, sc->kernels[0], &A, batch, cdiv(n_classes, sc->consts[0]), 1, stream);
}

/* ------------------------------------------------------------------ per-op entry points */
nvk_status nvk_conv_bn_relu(const void* x, const void* w, const void* b, void* out, int batch, int h, int w_,
                            int c_in, int c_out, int stride, nvk_dtype dt, void* stream) {
  const char* op = "conv_bn_relu";
  PTR(op, x); PTR(op, w); PTR(op, b); PTR(op, out);
  POS(op, batch); POS(op, h); POS(op, w_); POS(op, c_in); POS(op, c_out);
  CHECK(stride == 1 || stride == 2, "nvk_%s: stride must be 1 or 2, got %d", op, stride);
  DT(op, dt);
  int key[4] = {c_in, c_out, stride, 0 /* NHWC input */};
  const nvk_shape_class_t* sc = nvki_lookup(NVK_OP_CONV_BN_RELU, dt, key, 4, -1);
  if (!sc) return nvki_unsupported(NVK_OP_CONV_BN_RELU, dt, key, 3, "c_in, c_out, stride");
  const nvk_dptr_t dp[] = {DEV(x), DEV(w), DEV(b), DEV(out)};
  nvk_call_t call;
  nvk_status st = nvki_enter(op, stream, dp, NDEV(dp), &call);
  if (st) return st;
  st = nvki_run_conv(call.c, sc, x, w, b, out, batch, h, w_, c_in, c_out, stride, 0, stream);
  return nvki_leave(&call, st);
}

nvk_status nvk_patch_embed(const void* x, const void* w, const void* b, void* out, int batch, int h, int w_,
                           int c_in, int c_out, int stride, nvk_dtype dt, void* stream) {
  const char* op = "patch_embed";
  PTR(op, x); PTR(op, w); PTR(op, b); PTR(op, out);
  POS(op, batch); POS(op, h); POS(op, w_); POS(op, c_in); POS(op, c_out);
  CHECK(stride == 1 || stride == 2, "nvk_%s: stride must be 1 or 2, got %d", op, stride);
  DT(op, dt);
  int key[3] = {c_in, c_out, stride};
  const nvk_shape_class_t* sc = nvki_lookup(NVK_OP_PATCH_EMBED, dt, key, 3, -1);
  if (!sc) return nvki_unsupported(NVK_OP_PATCH_EMBED, dt, key, 3, "c_in, c_out, stride");
  const nvk_dptr_t dp[] = {DEV(x), DEV(w), DEV(b), DEV(out)};
  nvk_call_t call;
  nvk_status st = nvki_enter(op, stream, dp, NDEV(dp), &call);
  if (st) return st;
  st = nvki_run_patch_embed(call.c, sc, x, w, b, out, batch, h, w_, c_in, c_out, stride, stream);
  return nvki_leave(&call, st);
}

/* Bytes that cover every MHCA call with at most `rows` pixels: the classes of split mode
 * (two kernels) need the [pixels, c] hidden activation, up to their probe range's end. */
size_t nvk_mhca_workspace_size(int batch, int h, int w_, int c, int c_out, int residual, nvk_dtype dt) {
  if (batch <= 0 || h <= 0 || w_ <= 0 || c <= 0 || (int)dt < 0 || (int)dt > 2) return 0;
  long long rows = (long long)batch * h * w_;
  size_t need = 0;
  for (int i = 0; i < nvk_num_shape_classes; ++i) {
    const nvk_shape_class_t* s = &nvk_shape_classes[i];
    if (s->op != NVK_OP_MHCA || s->dtype != (int)dt || s->n_kernels < 2 || s->probe_lo > rows) continue;
    if (s->key[0] != c || s->key[1] != c_out || s->key[2] != residual) continue;
    long long m = s->probe_hi >= 0 && s->probe_hi < rows ? s->probe_hi : rows;
    size_t bytes = nvki_mhca_scratch(s, m, c, dt);
    if (bytes > need) need = bytes;
  }
  return need;
}

nvk_status nvk_mhca(const void* x, const void* conv_w, const void* conv_b, const void* proj_w, void* out,
                    void* workspace, int batch, int h, int w_, int c, int c_out, int residual, nvk_dtype dt,
                    void* stream) {
  const char* op = "mhca";
  PTR(op, x); PTR(op, conv_w); PTR(op, conv_b); PTR(op, proj_w); PTR(op, out);
  POS(op, batch); POS(op, h); POS(op, w_); POS(op, c); POS(op, c_out);
  CHECK(c % 32 == 0, "nvk_%s: c = %d is not a multiple of the head size 32", op, c);
  CHECK(residual == 0 || residual == 1, "nvk_%s: residual must be 0 or 1, got %d", op, residual);
  CHECK(!residual || c_out == c, "nvk_%s: residual needs c_out == c (got c=%d, c_out=%d)", op, c, c_out);
  DT(op, dt);
  long long m = (long long)batch * h * w_;
  int key[3] = {c, c_out, residual};
  const nvk_shape_class_t* sc = nvki_lookup(NVK_OP_MHCA, dt, key, 3, m);
  if (!sc) return nvki_unsupported(NVK_OP_MHCA, dt, key, 3, "c, c_out, residual");
  int split = sc->n_kernels == 2;
  if (split) PTR(op, workspace);
  const nvk_dptr_t dp[] = {DEV(x), DEV(conv_w), DEV(conv_b), DEV(proj_w), DEV(out), {"workspace", split ? workspace : NULL}};
  nvk_call_t call;
  nvk_status st = nvki_enter(op, stream, dp, NDEV(dp), &call);
  if (st) return st;
  st = nvki_run_mhca(call.c, sc, x, conv_w, conv_b, proj_w, out, workspace, batch, h, w_, c, c_out, stream);
  return nvki_leave(&call, st);
}

/* The shape class nvk_mlp launches for these arguments, or NULL (message set). */
static const nvk_shape_class_t* mlp_class(int c1, int c2, int hidden, int c_out, int residual, nvk_dtype dt) {
  int key[5] = {c1, c2, hidden, c_out, residual};
  const nvk_shape_class_t* sc = nvki_lookup(NVK_OP_MLP, dt, key, 5, -1);
  if (!sc) nvki_unsupported(NVK_OP_MLP, dt, key, 5, "c1, c2, hidden, c_out, residual");
  return sc;
}

size_t nvk_mlp_workspace_size(int batch, int h, int w_, int c1, int c2, int hidden, int c_out, int residual,
                              nvk_dtype dt) {
  if (batch <= 0 || h <= 0 || w_ <= 0 || hidden <= 0 || (int)dt < 0 || (int)dt > 2) return 0;
  const nvk_shape_class_t* sc = mlp_class(c1, c2, hidden, c_out, residual, dt);
  return sc ? nvki_mlp_scratch(sc, (long long)batch * h * w_, hidden, dt) : 0;
}

nvk_status nvk_mlp(const void* x, const void* x2, const void* fc1_w, const void* fc1_b, const void* fc2_w,
                   const void* fc2_b, void* out, void* workspace, int batch, int h, int w_, int c1, int c2,
                   int hidden, int c_out, int residual, nvk_dtype dt, void* stream) {
  const char* op = "mlp";
  PTR(op, x); PTR(op, fc1_w); PTR(op, fc1_b); PTR(op, fc2_w); PTR(op, fc2_b); PTR(op, out);
  if (x2) PTR(op, x2);
  POS(op, batch); POS(op, h); POS(op, w_); POS(op, c1); POS(op, hidden); POS(op, c_out);
  if (x2) {
    POS(op, c2);
  } else {
    CHECK(c2 == 0, "nvk_%s: x2 is NULL (no concat) but c2 = %d (must be 0)", op, c2);
  }
  CHECK(residual == 0 || residual == 1, "nvk_%s: residual must be 0 or 1, got %d", op, residual);
  CHECK(!residual || c_out == c1 + c2, "nvk_%s: residual needs c_out == c1 + c2 (got %d vs %d)", op, c_out, c1 + c2);
  DT(op, dt);
  const nvk_shape_class_t* sc = mlp_class(c1, c2, hidden, c_out, residual, dt);
  if (!sc) return NVK_ERR_UNSUPPORTED;
  int split = sc->n_kernels == 2;
  if (split) PTR(op, workspace);
  const nvk_dptr_t dp[] = {DEV(x), DEV(x2), DEV(fc1_w), DEV(fc1_b), DEV(fc2_w), DEV(fc2_b), DEV(out),
                           {"workspace", split ? workspace : NULL}};
  nvk_call_t call;
  nvk_status st = nvki_enter(op, stream, dp, NDEV(dp), &call);
  if (st) return st;
  st = nvki_run_mlp(call.c, sc, x, x2, fc1_w, fc1_b, fc2_w, fc2_b, out, workspace, batch, h, w_, c1, c2, hidden,
                    c_out, stream);
  return nvki_leave(&call, st);
}

size_t nvk_e_mhsa_workspace_size(int batch, int h, int w_, int c, int c_out, int sr_ratio, int head_dim,
                                 int residual, nvk_dtype dt) {
  if (batch <= 0 || h <= 0 || w_ <= 0 || c <= 0 || sr_ratio <= 0 || (int)dt < 0 || (int)dt > 2) return 0;
  long long nk = (long long)h * w_ / ((long long)sr_ratio * sr_ratio);
  int key[5] = {c, c_out, sr_ratio, head_dim, residual};
  const nvk_shape_class_t* sc = nk >= 1 ? nvki_lookup(NVK_OP_E_MHSA, dt, key, 5, nk) : NULL;
  return sc ? nvki_e_mhsa_scratch(sc, batch, h, w_, c, sr_ratio, dt) : 0;
}

nvk_status nvk_e_mhsa(const void* x, const void* q_w, const void* q_b, const void* k_w, const void* k_b,
                      const void* v_w, const void* v_b, const void* proj_w, const void* proj_b, void* out,
                      void* workspace, int batch, int h, int w_, int c, int c_out, int sr_ratio, int head_dim,
                      int residual, nvk_dtype dt, void* stream) {
  const char* op = "e_mhsa";
  PTR(op, x); PTR(op, q_w); PTR(op, q_b); PTR(op, k_w); PTR(op, k_b); PTR(op, v_w); PTR(op, v_b);
  PTR(op, proj_w); PTR(op, proj_b); PTR(op, out); PTR(op, workspace);
  POS(op, batch); POS(op, h); POS(op, w_); POS(op, c); POS(op, c_out); POS(op, sr_ratio); POS(op, head_dim);
  CHECK(head_dim >= 16 && head_dim <= 128 && !(head_dim & (head_dim - 1)),
        "nvk_%s: head_dim must be a power of two in [16, 128], got %d", op, head_dim);
  CHECK(c % head_dim == 0, "nvk_%s: c = %d is not a multiple of head_dim = %d", op, c, head_dim);
  CHECK(residual == 0 || residual == 1, "nvk_%s: residual must be 0 or 1, got %d", op, residual);
  CHECK(!residual || c_out == c, "nvk_%s: residual needs c_out == c (got c=%d, c_out=%d)", op, c, c_out);
  DT(op, dt);
  long long n = (long long)h * w_, r = (long long)sr_ratio * sr_ratio, nk = n / r;
  CHECK(nk >= 1, "nvk_%s: the %dx%d map has %lld tokens, fewer than one pooling window of sr_ratio^2 = %lld", op, h,
        w_, n, r);
  int key[5] = {c, c_out, sr_ratio, head_dim, residual};
  const nvk_shape_class_t* sc = nvki_lookup(NVK_OP_E_MHSA, dt, key, 5, nk);
  if (!sc) {
    if (nvki_lookup(NVK_OP_E_MHSA, dt, key, 5, -1))
      return nvki_fail(NVK_ERR_UNSUPPORTED, "nvk_%s: no kernel compiled for %lld key tokens at (c, c_out, sr_ratio, "
                       "head_dim, residual) = (%d, %d, %d, %d, %d)", op, nk, c, c_out, sr_ratio, head_dim, residual);
    return nvki_unsupported(NVK_OP_E_MHSA, dt, key, 5, "c, c_out, sr_ratio, head_dim, residual");
  }
  const nvk_dptr_t dp[] = {DEV(x), DEV(q_w), DEV(q_b), DEV(k_w), DEV(k_b), DEV(v_w), DEV(v_b), DEV(proj_w),
                           DEV(proj_b), DEV(out), DEV(workspace)};
  nvk_call_t call;
  nvk_status st = nvki_enter(op, stream, dp, NDEV(dp), &call);
  if (st) return st;
  st = nvki_run_e_mhsa(call.c, sc, x, q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b, out, workspace, batch, h, w_, c,
                       c_out, sr_ratio, head_dim, dt, stream);
  return nvki_leave(&call, st);
}

nvk_status nvk_head(const void* x, const void* w, const void* b, void* out, int batch, int h, int w_, int c,
                    int n_classes, nvk_dtype dt, void* stream) {
  const char* op = "head";
  PTR(op, x); PTR(op, w); PTR(op, b); PTR(op, out);
  POS(op, batch); POS(op, h); POS(op, w_); POS(op, c); POS(op, n_classes);
  DT(op, dt);
  int key[2] = {c, n_classes};
  const nvk_shape_class_t* sc = nvki_lookup(NVK_OP_HEAD, dt, key, 2, (long long)h * w_);
  if (!sc) return nvki_unsupported(NVK_OP_HEAD, dt, key, 2, "c, n_classes");
  const nvk_dptr_t dp[] = {DEV(x), DEV(w), DEV(b), DEV(out)};
  nvk_call_t call;
  nvk_status st = nvki_enter(op, stream, dp, NDEV(dp), &call);
  if (st) return st;
  st = nvki_run_head(call.c, sc, x, w, b, out, batch, h, w_, c, n_classes, stream);
  return nvki_leave(&call, st);
}
