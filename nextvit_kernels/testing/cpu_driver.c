/* CPU stand-in for the subset of the CUDA driver API that libnextvit_kernels.so uses.
 *
 * "Device" memory is host memory: cuMemAlloc returns malloc'ed bytes between unregistered
 * guard bytes, and anyone else's buffers (a test's tensors, nextvit_kernels.clib's outputs)
 * are made known with nvkcpu_register. Every pointer the C library asks about, copies to
 * or launches with must lie in a known buffer. One device (ordinal 0, reported as sm_90 or
 * as set by nvkcpu_set_compute_capability) with one primary context; streams are handles
 * whose work runs at once, on the calling thread.
 *
 * cuLaunchKernel checks what a GPU would refuse (grid and block limits, dynamic shared
 * memory above 48 KB without cuFuncSetAttribute or above the sm_90 limit) and then either
 * counts the launch (no callback: host-time measurements) or hands it to the callback that
 * nextvit_kernels.testing installs, which runs the same Triton kernel under the interpreter.
 * A refused launch returns an error whose cuGetErrorString text names the kernel and why.
 *
 * Hosted execute mode: a process that is not a Python process using nextvit_kernels.testing (a C
 * or C++ program, an inference server) gets computed launches too. With no callback installed and
 * TRITON_INTERPRET=1 in the environment, the first launch embeds Python (or joins the process's
 * own) and runs a bootstrap that installs the same callback; see "hosted execute mode" below.
 *
 * Built on first use by nextvit_kernels.testing (cc -shared); nothing else links it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

enum {
  OK = 0,
  ERR_INVALID_VALUE = 1,
  ERR_OUT_OF_MEMORY = 2,
  ERR_NO_DEVICE = 100,
  ERR_INVALID_DEVICE = 101,
  ERR_INVALID_IMAGE = 200,
  ERR_INVALID_CONTEXT = 201,
  ERR_INVALID_HANDLE = 400,
  ERR_NOT_FOUND = 500,
  ERR_ILLEGAL_ADDRESS = 700,
  ERR_LAUNCH_OUT_OF_RESOURCES = 701,
  ERR_UNKNOWN = 999,
};

#define MAX_DYN_SHARED_DEFAULT 49152   /* without the opt-in attribute */
#define MAX_DYN_SHARED_SM90 232448     /* 227 KB: sm_90's opt-in maximum per block */
#define GUARD 256                      /* unregistered bytes on both sides of an allocation */
#define MAX_PARAMS 128                 /* kernelParams are read up to their NULL terminator */

/* ------------------------------------------------------------------ errors */
static __thread char t_msg[1024];
static __thread int t_msg_code = -1;

static CUresult fail(CUresult code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(t_msg, sizeof t_msg, fmt, ap);
  va_end(ap);
  t_msg_code = code;
  return code;
}

static const char* code_name(CUresult r) {
  switch (r) {
    case OK: return "CUDA_SUCCESS";
    case ERR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case ERR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case ERR_NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
    case ERR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case ERR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
    case ERR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
    case ERR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case ERR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case ERR_ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
    case ERR_LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
    default: return "CUDA_ERROR_UNKNOWN";
  }
}

/* The last failure's text when it is the one asked about (the C library asks right after the
 * failing call, on the same thread), else the code's name. */
CUresult cuGetErrorString(CUresult r, const char** s) {
  static __thread char buf[1200];
  if (!s) return ERR_INVALID_VALUE;
  if (r == t_msg_code && t_msg[0]) {
    snprintf(buf, sizeof buf, "%s: CPU stand-in: %s", code_name(r), t_msg);
    *s = buf;
  } else {
    *s = code_name(r);
  }
  return OK;
}

/* ------------------------------------------------------------------ state */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

typedef struct {
  uintptr_t start;
  size_t size;
  int refs;
  void* owned; /* cuMemAlloc's block (with guards), freed by cuMemFree; NULL: registered */
} buffer_t;

static buffer_t* g_bufs;  /* sorted by start, then by size descending (outer before inner) */
static size_t g_nbufs, g_capbufs;

typedef struct {
  const void* image;
  int loaded;
} module_t;

typedef struct {
  int module;         /* index into g_mods */
  char name[256];
  int max_dynamic_shared;
} function_t;

typedef struct {
  int live; /* read without the lock by stream_index: atomic */
} stream_t;

/* Handles are small integers (index + 1) so that a bad handle is a bounds check, not a
 * dereference, and a lookup costs nothing in the counting mode's host-time measurements. */
#define MAX_MODULES 4096
#define MAX_FUNCTIONS 4096
#define MAX_STREAMS 1024
static module_t g_mods[MAX_MODULES];
static int g_nmods;
static function_t g_funcs[MAX_FUNCTIONS];
static int g_nfuncs;
static stream_t g_streams[MAX_STREAMS];
static int g_nstreams; /* slots ever used; destroyed ones are reused. Atomic: read without the lock */

static int g_cc = 90;
static int g_initialized;
static long long g_launches, g_allocs, g_frees, g_copies, g_syncs, g_memsets, g_live_allocs, g_live_bytes;
static long long g_primary_refs; /* cuDevicePrimaryCtxRetain minus cuDevicePrimaryCtxRelease */
static long long g_fail_alloc_after = -1; /* >= 0: that many more cuMemAlloc succeed, then fail */

/* The launch callback: (entry name, image, grid, block, dynamic shared bytes, stream,
 * kernelParams, their count) -> CUresult; NULL counts launches only. */
typedef int (*launch_cb_t)(const char*, const void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                           unsigned, void*, void**, int);
static launch_cb_t g_callback; /* atomic: launches on other threads read it */
/* 1 once nvkcpu_set_launch_callback was called: from then on the callback alone decides (NULL
 * counts), whatever TRITON_INTERPRET says. A Python process's cpu_driver() sets it, so its
 * execute=False counts although the tests' processes run with TRITON_INTERPRET=1. */
static int g_managed;

/* The one context: its address is the CUcontext handle. */
static int g_primary_ctx;
#define CTX ((void*)&g_primary_ctx)
static __thread void* t_stack[16];
static __thread int t_depth;

/* ------------------------------------------------------------------ buffer registry */
/* Index of the innermost buffer holding [p, p + n), or -1. Buffers nest or are disjoint. */
static long find_locked(uintptr_t p, size_t n) {
  size_t lo = 0, hi = g_nbufs;
  while (lo < hi) { /* first buffer with start > p */
    size_t mid = (lo + hi) / 2;
    if (g_bufs[mid].start <= p) lo = mid + 1; else hi = mid;
  }
  for (size_t i = lo; i-- > 0;) {
    const buffer_t* b = &g_bufs[i];
    if (p >= b->start && p - b->start <= b->size && n <= b->size - (p - b->start)) return (long)i;
  }
  return -1;
}

static CUresult add_locked(uintptr_t start, size_t size, void* owned) {
  for (size_t i = 0; i < g_nbufs; ++i) {
    buffer_t* b = &g_bufs[i];
    if (b->start == start && b->size == size && !owned && !b->owned) {
      ++b->refs;
      return OK;
    }
    uintptr_t bend = b->start + b->size, end = start + size;
    int disjoint = end <= b->start || start >= bend;
    int nested = (start >= b->start && end <= bend) || (b->start >= start && bend <= end);
    if (!disjoint && !nested)
      return fail(ERR_INVALID_VALUE, "buffer [%#lx, +%zu) partly overlaps the known buffer [%#lx, +%zu)",
                  (unsigned long)start, size, (unsigned long)b->start, b->size);
  }
  if (g_nbufs == g_capbufs) {
    size_t cap = g_capbufs ? 2 * g_capbufs : 256;
    buffer_t* nb = (buffer_t*)realloc(g_bufs, cap * sizeof *nb);
    if (!nb) return fail(ERR_OUT_OF_MEMORY, "out of host memory for the buffer registry");
    g_bufs = nb;
    g_capbufs = cap;
  }
  size_t at = 0;
  while (at < g_nbufs && (g_bufs[at].start < start || (g_bufs[at].start == start && g_bufs[at].size >= size))) ++at;
  memmove(&g_bufs[at + 1], &g_bufs[at], (g_nbufs - at) * sizeof *g_bufs);
  g_bufs[at] = (buffer_t){start, size, 1, owned};
  ++g_nbufs;
  return OK;
}

static void remove_at_locked(size_t i) {
  memmove(&g_bufs[i], &g_bufs[i + 1], (g_nbufs - i - 1) * sizeof *g_bufs);
  --g_nbufs;
}

/* Makes [p, p + size) known (a test's tensor, a clib output). Registering the same range
 * again counts a reference; ranges must nest or be disjoint. */
int nvkcpu_register(const void* p, size_t size) {
  if (!p || !size) return fail(ERR_INVALID_VALUE, "nvkcpu_register: NULL pointer or zero size");
  pthread_mutex_lock(&g_lock);
  CUresult r = add_locked((uintptr_t)p, size, NULL);
  pthread_mutex_unlock(&g_lock);
  return r;
}

int nvkcpu_unregister(const void* p, size_t size) {
  pthread_mutex_lock(&g_lock);
  for (size_t i = 0; i < g_nbufs; ++i) {
    buffer_t* b = &g_bufs[i];
    if (b->start == (uintptr_t)p && b->size == size && !b->owned) {
      if (--b->refs == 0) remove_at_locked(i);
      pthread_mutex_unlock(&g_lock);
      return OK;
    }
  }
  pthread_mutex_unlock(&g_lock);
  return fail(ERR_INVALID_VALUE, "nvkcpu_unregister: [%p, +%zu) was not registered", p, size);
}

/* The innermost known buffer holding [p, p + n): 1 and its start / size, else 0. */
int nvkcpu_find(const void* p, size_t n, uintptr_t* start, size_t* size) {
  pthread_mutex_lock(&g_lock);
  long i = find_locked((uintptr_t)p, n);
  if (i >= 0) {
    *start = g_bufs[i].start;
    *size = g_bufs[i].size;
  }
  pthread_mutex_unlock(&g_lock);
  return i >= 0;
}

/* ------------------------------------------------------------------ control */
void nvkcpu_set_launch_callback(launch_cb_t cb) {
  __atomic_store_n(&g_callback, cb, __ATOMIC_RELEASE);
  __atomic_store_n(&g_managed, 1, __ATOMIC_RELEASE);
}
void nvkcpu_set_compute_capability(int cc) { g_cc = cc; }
void nvkcpu_fail_alloc_after(long long n) { g_fail_alloc_after = n; }
/* The callback's message for the failure it is about to return. */
void nvkcpu_set_error(int code, const char* msg) { fail(code, "%s", msg ? msg : "?"); }

/* Counters since the last nvkcpu_reset_counters: launches, cuMemAlloc, cuMemFree, copies,
 * synchronizations; the allocations alive now, and their bytes (as requested); memsets. */
void nvkcpu_counters(long long out[8]) {
  pthread_mutex_lock(&g_lock);
  out[0] = g_launches;
  out[1] = g_allocs;
  out[2] = g_frees;
  out[3] = g_copies;
  out[4] = g_syncs;
  out[5] = g_live_allocs;
  out[6] = g_live_bytes;
  out[7] = g_memsets;
  pthread_mutex_unlock(&g_lock);
}

void nvkcpu_reset_counters(void) {
  pthread_mutex_lock(&g_lock);
  g_launches = g_allocs = g_frees = g_copies = g_syncs = g_memsets = 0;
  pthread_mutex_unlock(&g_lock);
}

/* Forgets every module and function; earlier handles are invalid afterwards. cpu_driver calls it
 * when it starts, once the C library has forgotten its handles (nvk_reset_driver), so that the
 * activations of one process do not fill the tables (MAX_MODULES) with modules nobody holds. */
void nvkcpu_reset_modules(void) {
  pthread_mutex_lock(&g_lock);
  g_nmods = g_nfuncs = 0;
  pthread_mutex_unlock(&g_lock);
}

/* ------------------------------------------------------------------ device, contexts */
/* $NEXTVIT_CPU_DRIVER_REPORT: the counters, as JSON, written there when the process exits, for a
 * process the tests cannot ask (a server: did unloading its models free what they allocated?). */
static char g_report[4096];

static void write_report(void) {
  long long c[8];
  nvkcpu_counters(c);
  FILE* f = fopen(g_report, "w");
  if (!f) return;
  fprintf(f, "{\"launches\": %lld, \"allocs\": %lld, \"frees\": %lld, \"copies\": %lld, \"syncs\": %lld, "
          "\"live_allocs\": %lld, \"live_bytes\": %lld, \"memsets\": %lld}\n", c[0], c[1], c[2], c[3], c[4], c[5],
          c[6], c[7]);
  fclose(f);
}

static void arm_report(void) {
  const char* path = getenv("NEXTVIT_CPU_DRIVER_REPORT");
  if (path && *path && strlen(path) < sizeof g_report) {
    strcpy(g_report, path);
    atexit(write_report); /* before the libraries' destructors run, whatever they do */
  }
}

CUresult cuInit(unsigned flags) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  if (flags) return fail(ERR_INVALID_VALUE, "cuInit: flags must be 0");
  pthread_once(&once, arm_report);
  g_initialized = 1;
  return OK;
}

#define NEED_INIT() \
  do { if (!g_initialized) return fail(3 /* CUDA_ERROR_NOT_INITIALIZED */, "cuInit was not called"); } while (0)

CUresult cuDriverGetVersion(int* v) {
  if (!v) return ERR_INVALID_VALUE;
  *v = 13000;
  return OK;
}

CUresult cuDeviceGetCount(int* n) {
  NEED_INIT();
  if (!n) return ERR_INVALID_VALUE;
  *n = 1;
  return OK;
}

CUresult cuDeviceGet(int* d, int ordinal) {
  NEED_INIT();
  if (!d) return ERR_INVALID_VALUE;
  if (ordinal != 0) return fail(ERR_INVALID_DEVICE, "cuDeviceGet: device %d (the stand-in has device 0 only)", ordinal);
  *d = 0;
  return OK;
}

CUresult cuDeviceGetAttribute(int* v, int attr, int d) {
  NEED_INIT();
  if (!v) return ERR_INVALID_VALUE;
  if (d != 0) return fail(ERR_INVALID_DEVICE, "cuDeviceGetAttribute: device %d", d);
  switch (attr) {
    case 1: *v = 1024; break;                       /* MAX_THREADS_PER_BLOCK */
    case 8: *v = MAX_DYN_SHARED_DEFAULT; break;     /* MAX_SHARED_MEMORY_PER_BLOCK */
    case 16: *v = 132; break;                       /* MULTIPROCESSOR_COUNT */
    case 75: *v = g_cc / 10; break;                 /* COMPUTE_CAPABILITY_MAJOR */
    case 76: *v = g_cc % 10; break;                 /* COMPUTE_CAPABILITY_MINOR */
    case 97: *v = MAX_DYN_SHARED_SM90; break;       /* MAX_SHARED_MEMORY_PER_BLOCK_OPTIN */
    default: *v = 0;
  }
  return OK;
}

CUresult cuDevicePrimaryCtxRetain(void** c, int d) {
  NEED_INIT();
  if (!c) return ERR_INVALID_VALUE;
  if (d != 0) return fail(ERR_INVALID_DEVICE, "cuDevicePrimaryCtxRetain: device %d", d);
  pthread_mutex_lock(&g_lock);
  ++g_primary_refs;
  pthread_mutex_unlock(&g_lock);
  *c = CTX;
  return OK;
}

/* The context stays usable when the count reaches 0 (a driver would destroy it): the stand-in's
 * memory is host memory, and a later retain gets the same context. A release without a retain is
 * the caller's bug, which a driver reports too. cuda.h 11+ names the call cuDevicePrimaryCtxRelease_v2
 * (a #define); libcuda exports both names, and so does the stand-in. */
CUresult cuDevicePrimaryCtxRelease_v2(int d) {
  NEED_INIT();
  if (d != 0) return fail(ERR_INVALID_DEVICE, "cuDevicePrimaryCtxRelease: device %d", d);
  pthread_mutex_lock(&g_lock);
  long long refs = g_primary_refs;
  if (refs > 0) --g_primary_refs;
  pthread_mutex_unlock(&g_lock);
  if (refs <= 0)
    return fail(ERR_INVALID_CONTEXT, "cuDevicePrimaryCtxRelease: device 0's primary context is not retained");
  return OK;
}

CUresult cuDevicePrimaryCtxRelease(int d) { return cuDevicePrimaryCtxRelease_v2(d); }

CUresult cuCtxGetCurrent(void** c) {
  NEED_INIT();
  if (!c) return ERR_INVALID_VALUE;
  *c = t_depth ? t_stack[t_depth - 1] : NULL;
  return OK;
}

static CUresult check_ctx(void* c, const char* fn) {
  return c == CTX ? OK : fail(ERR_INVALID_CONTEXT, "%s: %p is not a context", fn, c);
}

CUresult cuCtxSetCurrent(void* c) {
  NEED_INIT();
  if (!c) {
    if (t_depth) --t_depth;
    return OK;
  }
  if (check_ctx(c, "cuCtxSetCurrent")) return ERR_INVALID_CONTEXT;
  if (t_depth) t_stack[t_depth - 1] = c;
  else t_stack[t_depth++] = c;
  return OK;
}

CUresult cuCtxPushCurrent_v2(void* c) {
  NEED_INIT();
  if (check_ctx(c, "cuCtxPushCurrent")) return ERR_INVALID_CONTEXT;
  if (t_depth == (int)(sizeof t_stack / sizeof *t_stack)) return fail(ERR_INVALID_VALUE, "context stack full");
  t_stack[t_depth++] = c;
  return OK;
}

CUresult cuCtxPopCurrent_v2(void** c) {
  NEED_INIT();
  if (!t_depth) return fail(ERR_INVALID_CONTEXT, "cuCtxPopCurrent: no context is current");
  void* top = t_stack[--t_depth];
  if (c) *c = top;
  return OK;
}

CUresult cuCtxGetDevice(int* d) {
  NEED_INIT();
  if (!d) return ERR_INVALID_VALUE;
  if (!t_depth) return fail(ERR_INVALID_CONTEXT, "cuCtxGetDevice: no context is current");
  *d = 0;
  return OK;
}

CUresult cuCtxSynchronize(void) {
  NEED_INIT();
  if (!t_depth) return fail(ERR_INVALID_CONTEXT, "cuCtxSynchronize: no context is current");
  pthread_mutex_lock(&g_lock);
  ++g_syncs;
  pthread_mutex_unlock(&g_lock);
  return OK;
}

/* ------------------------------------------------------------------ streams */
#define LEGACY ((uintptr_t)0x1)
#define PER_THREAD ((uintptr_t)0x2)
#define STREAM_BASE ((uintptr_t)0x5000)

/* 0: a default stream; i + 1: created stream i; -1: not a stream. */
static int stream_index(void* s) {
  uintptr_t v = (uintptr_t)s;
  if (!v || v == LEGACY || v == PER_THREAD) return 0;
  if (v < STREAM_BASE + 1 || v > STREAM_BASE + (uintptr_t)__atomic_load_n(&g_nstreams, __ATOMIC_ACQUIRE)) return -1;
  int i = (int)(v - STREAM_BASE - 1);
  return __atomic_load_n(&g_streams[i].live, __ATOMIC_ACQUIRE) ? i + 1 : -1;
}

/* A destroyed stream's slot is handed out again (a server creates and destroys streams at every
 * model load): its old handle then names the new stream, as a reused CUstream does on a GPU. */
CUresult cuStreamCreate(void** s, unsigned flags) {
  NEED_INIT();
  (void)flags;
  if (!s) return ERR_INVALID_VALUE;
  if (!t_depth) return fail(ERR_INVALID_CONTEXT, "cuStreamCreate: no context is current");
  pthread_mutex_lock(&g_lock);
  int i = 0;
  while (i < g_nstreams && g_streams[i].live) ++i;
  if (i == MAX_STREAMS) {
    pthread_mutex_unlock(&g_lock);
    return fail(ERR_OUT_OF_MEMORY, "cuStreamCreate: more than %d streams alive", MAX_STREAMS);
  }
  __atomic_store_n(&g_streams[i].live, 1, __ATOMIC_RELEASE);
  if (i == g_nstreams) __atomic_store_n(&g_nstreams, i + 1, __ATOMIC_RELEASE);
  *s = (void*)(STREAM_BASE + (uintptr_t)i + 1);
  pthread_mutex_unlock(&g_lock);
  return OK;
}

CUresult cuStreamDestroy_v2(void* s) {
  NEED_INIT();
  pthread_mutex_lock(&g_lock);
  int i = stream_index(s);
  if (i > 0) __atomic_store_n(&g_streams[i - 1].live, 0, __ATOMIC_RELEASE);
  pthread_mutex_unlock(&g_lock);
  if (i <= 0) return fail(ERR_INVALID_HANDLE, "cuStreamDestroy: %p is not a created stream", s);
  return OK;
}

CUresult cuStreamGetCtx(void* s, void** c) {
  NEED_INIT();
  if (!c) return ERR_INVALID_VALUE;
  int i = stream_index(s);
  if (i < 0) return fail(ERR_INVALID_HANDLE, "cuStreamGetCtx: %p is not a stream", s);
  *c = i == 0 ? (t_depth ? t_stack[t_depth - 1] : NULL) : CTX;
  return OK;
}

CUresult cuStreamSynchronize(void* s) {
  NEED_INIT();
  if (stream_index(s) < 0) return fail(ERR_INVALID_HANDLE, "cuStreamSynchronize: %p is not a stream", s);
  pthread_mutex_lock(&g_lock);
  ++g_syncs;
  pthread_mutex_unlock(&g_lock);
  return OK;
}

/* ------------------------------------------------------------------ memory */
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t size) {
  NEED_INIT();
  if (!p) return ERR_INVALID_VALUE;
  if (!t_depth) return fail(ERR_INVALID_CONTEXT, "cuMemAlloc: no context is current");
  if (!size) return fail(ERR_INVALID_VALUE, "cuMemAlloc: size 0");
  if (size > ((size_t)1 << 40)) return fail(ERR_OUT_OF_MEMORY, "cuMemAlloc: %zu bytes", size);
  pthread_mutex_lock(&g_lock);
  if (g_fail_alloc_after == 0) {
    pthread_mutex_unlock(&g_lock);
    return fail(ERR_OUT_OF_MEMORY, "cuMemAlloc: failing as asked (nvkcpu_fail_alloc_after)");
  }
  if (g_fail_alloc_after > 0) --g_fail_alloc_after;
  size_t total = (GUARD + size + GUARD + 255) & ~(size_t)255;
  unsigned char* block = (unsigned char*)aligned_alloc(256, total);
  if (!block) {
    pthread_mutex_unlock(&g_lock);
    return fail(ERR_OUT_OF_MEMORY, "cuMemAlloc: out of host memory for %zu bytes", size);
  }
  memset(block, 0xA5, total); /* like a GPU's, fresh memory is not zero */
  CUresult r = add_locked((uintptr_t)(block + GUARD), size, block);
  if (r) {
    free(block);
  } else {
    *p = (CUdeviceptr)(uintptr_t)(block + GUARD);
    ++g_allocs;
    ++g_live_allocs;
    g_live_bytes += (long long)size;
  }
  pthread_mutex_unlock(&g_lock);
  return r;
}

CUresult cuMemFree_v2(CUdeviceptr p) {
  NEED_INIT();
  pthread_mutex_lock(&g_lock);
  for (size_t i = 0; i < g_nbufs; ++i) {
    if (g_bufs[i].owned && g_bufs[i].start == (uintptr_t)p) {
      g_live_bytes -= (long long)g_bufs[i].size;
      free(g_bufs[i].owned);
      remove_at_locked(i);
      ++g_frees;
      --g_live_allocs;
      pthread_mutex_unlock(&g_lock);
      return OK;
    }
  }
  pthread_mutex_unlock(&g_lock);
  return fail(ERR_INVALID_VALUE, "cuMemFree: %#llx is not an allocation of cuMemAlloc", p);
}

static CUresult copy(void* dst, const void* src, size_t n, int dst_device, int src_device, const char* fn) {
  NEED_INIT();
  if (!n) return OK;
  if (!dst || !src) return fail(ERR_INVALID_VALUE, "%s: NULL pointer", fn);
  pthread_mutex_lock(&g_lock);
  long di = dst_device ? find_locked((uintptr_t)dst, n) : 0, si = src_device ? find_locked((uintptr_t)src, n) : 0;
  if (di >= 0 && si >= 0) ++g_copies;
  pthread_mutex_unlock(&g_lock);
  if (di < 0 || si < 0)
    return fail(ERR_INVALID_VALUE, "%s: %zu bytes at %s %p are not inside one known buffer", fn, n,
                di < 0 ? "destination" : "source", di < 0 ? dst : src);
  memmove(dst, src, n);
  return OK;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
  return copy((void*)(uintptr_t)dst, src, n, 1, 0, "cuMemcpyHtoD");
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* stream) {
  if (stream_index(stream) < 0) return fail(ERR_INVALID_HANDLE, "cuMemcpyHtoDAsync: %p is not a stream", stream);
  return copy((void*)(uintptr_t)dst, src, n, 1, 0, "cuMemcpyHtoDAsync");
}

CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
  return copy(dst, (const void*)(uintptr_t)src, n, 0, 1, "cuMemcpyDtoH");
}

CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* stream) {
  if (stream_index(stream) < 0) return fail(ERR_INVALID_HANDLE, "cuMemcpyDtoHAsync: %p is not a stream", stream);
  return copy(dst, (const void*)(uintptr_t)src, n, 0, 1, "cuMemcpyDtoHAsync");
}

CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  return copy((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n, 1, 1, "cuMemcpyDtoD");
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* stream) {
  if (stream_index(stream) < 0) return fail(ERR_INVALID_HANDLE, "cuMemcpyDtoDAsync: %p is not a stream", stream);
  return copy((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n, 1, 1, "cuMemcpyDtoDAsync");
}

static CUresult memset8(CUdeviceptr dst, unsigned char value, size_t n, const char* fn) {
  NEED_INIT();
  if (!n) return OK;
  pthread_mutex_lock(&g_lock);
  long i = find_locked((uintptr_t)dst, n);
  if (i >= 0) ++g_memsets;
  pthread_mutex_unlock(&g_lock);
  if (i < 0) return fail(ERR_INVALID_VALUE, "%s: %zu bytes at %#llx are not inside one known buffer", fn, n, dst);
  memset((void*)(uintptr_t)dst, value, n);
  return OK;
}

CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) { return memset8(dst, value, n, "cuMemsetD8"); }

CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, void* stream) {
  if (stream_index(stream) < 0) return fail(ERR_INVALID_HANDLE, "cuMemsetD8Async: %p is not a stream", stream);
  return memset8(dst, value, n, "cuMemsetD8Async");
}

CUresult cuPointerGetAttribute(void* data, int attr, CUdeviceptr p) {
  NEED_INIT();
  if (!data) return ERR_INVALID_VALUE;
  if (attr != 9 /* DEVICE_ORDINAL */) return fail(ERR_INVALID_VALUE, "cuPointerGetAttribute: attribute %d", attr);
  uintptr_t s;
  size_t n;
  if (!nvkcpu_find((const void*)(uintptr_t)p, 1, &s, &n))
    return fail(ERR_INVALID_VALUE, "cuPointerGetAttribute: %#llx is not in a buffer known to the stand-in", p);
  *(int*)data = 0;
  return OK;
}

/* ------------------------------------------------------------------ modules, functions */
CUresult cuModuleLoadData(void** m, const void* image) {
  NEED_INIT();
  if (!m || !image) return ERR_INVALID_VALUE;
  if (!t_depth) return fail(ERR_INVALID_CONTEXT, "cuModuleLoadData: no context is current");
  pthread_mutex_lock(&g_lock);
  if (g_nmods == MAX_MODULES) {
    pthread_mutex_unlock(&g_lock);
    return fail(ERR_OUT_OF_MEMORY, "cuModuleLoadData: more than %d modules", MAX_MODULES);
  }
  g_mods[g_nmods] = (module_t){image, 1};
  *m = (void*)(uintptr_t)++g_nmods;
  pthread_mutex_unlock(&g_lock);
  return OK;
}

static int module_index(void* m) {
  uintptr_t v = (uintptr_t)m;
  if (v < 1 || v > (uintptr_t)g_nmods || !g_mods[v - 1].loaded) return -1;
  return (int)(v - 1);
}

CUresult cuModuleUnload(void* m) {
  NEED_INIT();
  int i = module_index(m);
  if (i < 0) return fail(ERR_INVALID_HANDLE, "cuModuleUnload: %p is not a loaded module", m);
  g_mods[i].loaded = 0;
  return OK;
}

CUresult cuModuleGetFunction(void** f, void* m, const char* name) {
  NEED_INIT();
  if (!f || !name) return ERR_INVALID_VALUE;
  int mi = module_index(m);
  if (mi < 0) return fail(ERR_INVALID_HANDLE, "cuModuleGetFunction: %p is not a loaded module", m);
  size_t len = strnlen(name, 256);
  if (len == 0 || len == 256) return fail(ERR_NOT_FOUND, "cuModuleGetFunction: bad entry name");
  pthread_mutex_lock(&g_lock);
  if (g_nfuncs == MAX_FUNCTIONS) {
    pthread_mutex_unlock(&g_lock);
    return fail(ERR_OUT_OF_MEMORY, "cuModuleGetFunction: more than %d functions", MAX_FUNCTIONS);
  }
  function_t* fn = &g_funcs[g_nfuncs];
  fn->module = mi;
  memcpy(fn->name, name, len + 1);
  fn->max_dynamic_shared = MAX_DYN_SHARED_DEFAULT;
  *f = (void*)(uintptr_t)++g_nfuncs;
  pthread_mutex_unlock(&g_lock);
  return OK;
}

static function_t* function_of(void* f) {
  uintptr_t v = (uintptr_t)f;
  return v >= 1 && v <= (uintptr_t)g_nfuncs ? &g_funcs[v - 1] : NULL;
}

CUresult cuFuncGetAttribute(int* v, int attr, void* f) {
  NEED_INIT();
  function_t* fn = function_of(f);
  if (!v || !fn) return fail(ERR_INVALID_HANDLE, "cuFuncGetAttribute: %p is not a function", f);
  switch (attr) {
    case 0: *v = 1024; break;                        /* MAX_THREADS_PER_BLOCK */
    case 8: *v = fn->max_dynamic_shared; break;      /* MAX_DYNAMIC_SHARED_SIZE_BYTES */
    default: *v = 0;                                 /* static shared memory, registers, ... */
  }
  return OK;
}

CUresult cuFuncSetAttribute(void* f, int attr, int value) {
  NEED_INIT();
  function_t* fn = function_of(f);
  if (!fn) return fail(ERR_INVALID_HANDLE, "cuFuncSetAttribute: %p is not a function", f);
  if (attr != 8) return fail(ERR_INVALID_VALUE, "cuFuncSetAttribute: attribute %d not modelled", attr);
  if (value < 0 || value > MAX_DYN_SHARED_SM90)
    return fail(ERR_INVALID_VALUE, "cuFuncSetAttribute(%s): %d bytes of dynamic shared memory, above sm_90's %d",
                fn->name, value, MAX_DYN_SHARED_SM90);
  fn->max_dynamic_shared = value;
  return OK;
}

/* ------------------------------------------------------------------ hosted execute mode */
/* A process that no Python cpu_driver() manages (g_managed == 0) and that has TRITON_INTERPRET=1
 * in its environment gets computed launches: the first launch (once, under pthread_once; the
 * other threads' first launches wait for it) makes Python available, runs BOOTSTRAP, which calls
 * nextvit_kernels.testing._host to install the execute-mode callback into this library, and lets
 * go of the GIL, which each launch's ctypes callback then takes on its own thread.
 *
 * Python: the process's own when it already runs one (Py_IsInitialized found among its symbols:
 * the stand-in inside a Python process), else the libpython that $NEXTVIT_CPU_DRIVER_PYTHON names,
 * dlopened RTLD_GLOBAL (extension modules resolve the C API from it) and initialized without signal
 * handlers. Only stable-ABI functions are used and no Python header is needed. The bootstrap adds
 * each entry of $NEXTVIT_CPU_DRIVER_PYTHONPATH with site.addsitedir (its .pth files too: a venv's
 * editable install) before importing the package. The manifest comes from the library that made
 * the first launch (dladdr of cuLaunchKernel's return address): the library this process really
 * loaded, wherever it lies; $NEXTVIT_CLIB (or the installed one) only when that object is not one.
 * nextvit_kernels.testing.hosted_environment() gives every variable. A failure (a variable
 * missing, the Python exception of the bootstrap) fails this launch and every later one with its
 * text. */
#define PYTHON_ENV "NEXTVIT_CPU_DRIVER_PYTHON"
#define PYTHONPATH_ENV "NEXTVIT_CPU_DRIVER_PYTHONPATH"

static pthread_once_t g_host_once = PTHREAD_ONCE_INIT;
static const void* g_host_caller;  /* a return address in the library of the first hosted launch */
static char g_host_error[900];     /* why hosting failed; "" when it worked */
static char g_host_python_error[700]; /* the bootstrap's Python exception (nvkcpu_host_failed) */

/* The bootstrap's report of its own exception, through ctypes. */
void nvkcpu_host_failed(const char* msg) {
  snprintf(g_host_python_error, sizeof g_host_python_error, "%s", msg ? msg : "?");
}

/* Python 3 code; the two %s are hex strings: this library's path, the C library's ("" unknown).
 * Hex, so that no path can break the literal. */
static const char BOOTSTRAP[] =
    "def _nvk_host_bootstrap():\n"
    "    import os, sys\n"
    "    me, lib = (bytes.fromhex(h).decode(errors='surrogateescape') for h in ('%s', '%s'))\n"
    "    try:\n"
    "        import site\n"
    "        want = [p for p in os.environ.get('" PYTHONPATH_ENV "', '').split(os.pathsep) if p]\n"
    "        for p in want:\n"
    "            if p not in sys.path:\n"
    "                site.addsitedir(p)\n"
    "        sys.path[:] = [p for p in want if p in sys.path] + [p for p in sys.path if p not in want]\n"
    "        from nextvit_kernels import testing\n"
    "        testing._host(me, lib or None)\n"
    "    except BaseException as e:\n"
    "        import ctypes, traceback\n"
    "        msg = ''.join(traceback.format_exception_only(type(e), e)).strip()\n"
    "        ctypes.CDLL(me).nvkcpu_host_failed(msg.encode(errors='replace'))\n"
    "_nvk_host_bootstrap()\n"
    "del _nvk_host_bootstrap\n";

static void hex_of(const char* s, char* out, size_t cap) {
  size_t i = 0;
  for (; s && *s && 2 * i + 2 < cap; ++s, ++i) snprintf(out + 2 * i, 3, "%02x", (unsigned char)*s);
  out[2 * i] = 0;
}

#define HOST_FAIL(...) snprintf(g_host_error, sizeof g_host_error, __VA_ARGS__)

static void host_python(void) {
  typedef int (*is_initialized_t)(void);
  typedef void (*initialize_ex_t)(int);
  typedef int (*run_simple_string_t)(const char*);
  typedef void* (*save_thread_t)(void);
  typedef int (*gil_ensure_t)(void); /* PyGILState_STATE is an enum */
  typedef void (*gil_release_t)(int);
  Dl_info self, caller;
  if (!dladdr((void*)&nvkcpu_host_failed, &self) || !self.dli_fname) {
    HOST_FAIL("cannot find the stand-in's own path (dladdr)");
    return;
  }
  /* the C library that launched: used for its manifest when it exports one */
  const char* lib = "";
  if (dladdr(__atomic_load_n(&g_host_caller, __ATOMIC_ACQUIRE), &caller) && caller.dli_fname) {
    void* h = dlopen(caller.dli_fname, RTLD_NOW | RTLD_NOLOAD);
    if (h) {
      if (dlsym(h, "nvk_manifest")) lib = caller.dli_fname;
      dlclose(h);
    }
  }
  void* py = RTLD_DEFAULT;
  is_initialized_t is_initialized;
  void* sym = dlsym(RTLD_DEFAULT, "Py_IsInitialized");
  memcpy(&is_initialized, &sym, sizeof sym);
  int joined = is_initialized && is_initialized();
  if (!joined) {
    const char* path = getenv(PYTHON_ENV);
    if (!path || !*path) {
      HOST_FAIL("TRITON_INTERPRET=1 asks for the launches to run under Triton's interpreter, which the stand-in "
                "hosts in an embedded Python: set " PYTHON_ENV " to the libpython to load (and "
                PYTHONPATH_ENV "; nextvit_kernels.testing.hosted_environment() gives every variable), or unset "
                "TRITON_INTERPRET to count launches only");
      return;
    }
    if (!(py = dlopen(path, RTLD_NOW | RTLD_GLOBAL))) {
      const char* e = dlerror();
      HOST_FAIL("dlopen(%s) failed (%s), named by " PYTHON_ENV, path, e ? e : "?");
      return;
    }
  }
  initialize_ex_t initialize_ex;
  run_simple_string_t run;
  save_thread_t save_thread;
  gil_ensure_t gil_ensure;
  gil_release_t gil_release;
  struct { void** slot; const char* name; } syms[] = {
      {(void**)&is_initialized, "Py_IsInitialized"}, {(void**)&initialize_ex, "Py_InitializeEx"},
      {(void**)&run, "PyRun_SimpleString"}, {(void**)&save_thread, "PyEval_SaveThread"},
      {(void**)&gil_ensure, "PyGILState_Ensure"}, {(void**)&gil_release, "PyGILState_Release"}};
  for (size_t i = 0; i < sizeof syms / sizeof *syms; ++i) {
    if (!(sym = dlsym(py, syms[i].name))) {
      HOST_FAIL("%s lacks %s: not a libpython", joined ? "the process" : getenv(PYTHON_ENV), syms[i].name);
      return;
    }
    memcpy(syms[i].slot, &sym, sizeof sym);
  }
  static char code[sizeof BOOTSTRAP + 2 * 2 * 4096];
  char me_hex[2 * 4096 + 1], lib_hex[2 * 4096 + 1];
  hex_of(self.dli_fname, me_hex, sizeof me_hex);
  hex_of(lib, lib_hex, sizeof lib_hex);
  snprintf(code, sizeof code, BOOTSTRAP, me_hex, lib_hex);
  int rc;
  if (is_initialized()) { /* a Python process, or one that embedded Python before us */
    int g = gil_ensure();
    rc = run(code);
    gil_release(g);
  } else {
    initialize_ex(0); /* no signal handlers: the host process owns its signals */
    rc = run(code);
    save_thread(); /* this thread's state is kept; ctypes callbacks take the GIL on each thread */
  }
  if (g_host_python_error[0])
    HOST_FAIL("the Python bootstrap of hosted execute mode failed: %s", g_host_python_error);
  else if (rc)
    HOST_FAIL("the Python bootstrap of hosted execute mode failed (its traceback is on stderr)");
  else if (!__atomic_load_n(&g_callback, __ATOMIC_ACQUIRE))
    HOST_FAIL("the Python bootstrap installed its callback into another copy of the stand-in than %s",
              self.dli_fname);
}

/* The launch callback for a launch with none installed: NULL to count; on failure *r is set. */
static launch_cb_t hosted_callback(const void* caller, const char* k, CUresult* r) {
  const char* interpret = getenv("TRITON_INTERPRET");
  if (!interpret || strcmp(interpret, "1")) return NULL;
  const void* none = NULL; /* the first launching thread's caller names the library */
  __atomic_compare_exchange_n(&g_host_caller, &none, caller, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
  pthread_once(&g_host_once, host_python);
  if (g_host_error[0]) {
    *r = fail(ERR_UNKNOWN, "cuLaunchKernel(%s): %s", k, g_host_error);
    return NULL;
  }
  return __atomic_load_n(&g_callback, __ATOMIC_ACQUIRE);
}

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, void* stream, void** params, void** extra) {
  NEED_INIT();
  function_t* fn = function_of(f);
  if (!fn) return fail(ERR_INVALID_HANDLE, "cuLaunchKernel: %p is not a function", f);
  const char* k = fn->name;
  if (!t_depth) return fail(ERR_INVALID_CONTEXT, "cuLaunchKernel(%s): no context is current", k);
  if (stream_index(stream) < 0) return fail(ERR_INVALID_HANDLE, "cuLaunchKernel(%s): %p is not a stream", k, stream);
  if (!g_mods[fn->module].loaded) return fail(ERR_INVALID_HANDLE, "cuLaunchKernel(%s): its module was unloaded", k);
  if (gx < 1 || gy < 1 || gz < 1 || gx > 2147483647u || gy > 65535 || gz > 65535)
    return fail(ERR_INVALID_VALUE, "cuLaunchKernel(%s): grid (%u, %u, %u) outside CUDA's limits "
                "(x <= 2^31-1, y and z <= 65535, none 0)", k, gx, gy, gz);
  if (bx < 1 || by < 1 || bz < 1 || bx > 1024 || by > 1024 || bz > 64 ||
      (unsigned long long)bx * by * bz > 1024)
    return fail(ERR_INVALID_VALUE, "cuLaunchKernel(%s): block (%u, %u, %u) outside CUDA's limits", k, bx, by, bz);
  if (shared > MAX_DYN_SHARED_SM90)
    return fail(ERR_INVALID_VALUE, "cuLaunchKernel(%s): %u bytes of dynamic shared memory, above sm_90's %d per block",
                k, shared, MAX_DYN_SHARED_SM90);
  if ((int)shared > fn->max_dynamic_shared)
    return fail(ERR_INVALID_VALUE, "cuLaunchKernel(%s): %u bytes of dynamic shared memory, above the %d that "
                "cuFuncSetAttribute allowed", k, shared, fn->max_dynamic_shared);
  if (extra) return fail(ERR_INVALID_VALUE, "cuLaunchKernel(%s): `extra` is not supported by the stand-in", k);
  if (!params) return fail(ERR_INVALID_VALUE, "cuLaunchKernel(%s): kernelParams is NULL", k);
  /* The C library ends kernelParams with a NULL entry (a real driver reads just the kernel's
   * count), which is how the parameter count is known here. */
  int n = 0;
  while (n < MAX_PARAMS && params[n]) ++n;
  if (n == MAX_PARAMS)
    return fail(ERR_INVALID_VALUE, "cuLaunchKernel(%s): kernelParams has no NULL terminator", k);
  pthread_mutex_lock(&g_lock);
  ++g_launches;
  pthread_mutex_unlock(&g_lock);
  launch_cb_t cb = __atomic_load_n(&g_callback, __ATOMIC_ACQUIRE);
  if (!cb && !__atomic_load_n(&g_managed, __ATOMIC_ACQUIRE)) {
    CUresult hr = OK;
    cb = hosted_callback(__builtin_return_address(0), k, &hr);
    if (hr) return hr;
  }
  if (!cb) return OK;
  t_msg_code = -1;
  CUresult r = cb(k, g_mods[fn->module].image, gx, gy, gz, bx, by, bz, shared, stream, params, n);
  if (r && t_msg_code != r) fail(r, "launch of %s failed in the interpreter callback", k);
  return r;
}
