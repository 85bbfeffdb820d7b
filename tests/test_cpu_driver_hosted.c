/* A process that is not Python, driving libnextvit_kernels.so through the CPU stand-in's hosted
 * execute mode (tests/test_cpu_driver_hosted.py builds and runs it with
 * nextvit_kernels.testing.hosted_environment()): device memory from the driver that
 * $NEXTVIT_CUDA_DRIVER names, calls from THREADS threads started together, each on a stream of its
 * own with its own output (and workspace), results copied back with cuMemcpyDtoHAsync.
 *
 *   hosted model MODEL.nvk INPUT.f32 B H W THREADS   # nvk_model_forward, fp32 NCHW input
 *   hosted head INPUT.f32 B H W C N THREADS          # nvk_head; INPUT: x (NHWC), w (N x C), b (N)
 *
 * Prints one line per thread, "T v0 v1 ...", the outputs in full precision; on a failure the
 * library's message on stderr and exit status 1. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nextvit_kernels.h"

typedef unsigned long long dptr;
static struct {
  int (*init)(unsigned);
  int (*device_get)(int*, int);
  int (*retain)(void**, int);
  int (*release)(int);
  int (*set_current)(void*);
  int (*alloc)(dptr*, size_t);
  int (*free_)(dptr);
  int (*htod)(dptr, const void*, size_t);
  int (*dtoh_async)(void*, dptr, size_t, void*);
  int (*stream_create)(void**, unsigned);
  int (*stream_sync)(void*);
  int (*stream_destroy)(void*);
  int (*error_string)(int, const char**);
} cu;

static void* g_ctx;
static pthread_barrier_t g_start;
static pthread_mutex_t g_print = PTHREAD_MUTEX_INITIALIZER;

static int die(const char* what, const char* detail) {
  fprintf(stderr, "hosted: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  return 1;
}

static int cu_failed(const char* what, int r) {
  const char* s = NULL;
  cu.error_string(r, &s);
  return die(what, s);
}

static int open_driver(void) {
  const char* name = getenv("NEXTVIT_CUDA_DRIVER");
  if (!name || !*name) return die("NEXTVIT_CUDA_DRIVER is not set", NULL);
  void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
  if (!h) return die("dlopen", dlerror());
  struct { void** slot; const char* sym; } syms[] = {
      {(void**)&cu.init, "cuInit"}, {(void**)&cu.device_get, "cuDeviceGet"},
      {(void**)&cu.retain, "cuDevicePrimaryCtxRetain"}, {(void**)&cu.release, "cuDevicePrimaryCtxRelease_v2"},
      {(void**)&cu.set_current, "cuCtxSetCurrent"}, {(void**)&cu.alloc, "cuMemAlloc_v2"},
      {(void**)&cu.free_, "cuMemFree_v2"}, {(void**)&cu.htod, "cuMemcpyHtoD_v2"},
      {(void**)&cu.dtoh_async, "cuMemcpyDtoHAsync_v2"}, {(void**)&cu.stream_create, "cuStreamCreate"},
      {(void**)&cu.stream_sync, "cuStreamSynchronize"}, {(void**)&cu.stream_destroy, "cuStreamDestroy_v2"},
      {(void**)&cu.error_string, "cuGetErrorString"}};
  for (size_t i = 0; i < sizeof syms / sizeof *syms; ++i) {
    void* p = dlsym(h, syms[i].sym);
    if (!p) return die("the driver lacks", syms[i].sym);
    memcpy(syms[i].slot, &p, sizeof p);
  }
  int d, r;
  if ((r = cu.init(0)) || (r = cu.device_get(&d, 0)) || (r = cu.retain(&g_ctx, d)) || (r = cu.set_current(g_ctx)))
    return cu_failed("no usable device", r);
  return 0;
}

static float* read_floats(const char* path, size_t n) {
  FILE* f = fopen(path, "rb");
  float* v = f ? (float*)malloc(n * sizeof *v) : NULL;
  if (v && fread(v, sizeof *v, n, f) != n) {
    free(v);
    v = NULL;
  }
  if (f) fclose(f);
  return v;
}

/* ------------------------------------------------------------------ the work of one thread */
static struct {
  int head; /* 0: the model */
  nvk_model* model;
  dptr x, w, b;
  int batch, h, w_, c, n;
  size_t n_out, ws_bytes;
} job;

typedef struct {
  int index, status;
  float* out;
} worker_t;

static void* work(void* arg) {
  worker_t* me = (worker_t*)arg;
  me->status = 1;
  int r;
  void* stream = NULL;
  dptr out = 0, ws = 0;
  pthread_barrier_wait(&g_start);
  if ((r = cu.set_current(g_ctx)) || (r = cu.stream_create(&stream, 0)) ||
      (r = cu.alloc(&out, job.n_out * sizeof(float))) || (job.ws_bytes && (r = cu.alloc(&ws, job.ws_bytes)))) {
    cu_failed("setting up a thread", r);
    return NULL;
  }
  nvk_status st = job.head
      ? nvk_head((const void*)(uintptr_t)job.x, (const void*)(uintptr_t)job.w, (const void*)(uintptr_t)job.b,
                 (void*)(uintptr_t)out, job.batch, job.h, job.w_, job.c, job.n, NVK_F32, stream)
      : nvk_model_forward(job.model, (const void*)(uintptr_t)job.x, NVK_NCHW, (void*)(uintptr_t)out,
                          (void*)(uintptr_t)ws, job.ws_bytes, job.batch, job.h, job.w_, stream);
  if (st) {
    pthread_mutex_lock(&g_print);
    die(job.head ? "nvk_head" : "nvk_model_forward", nvk_last_error());
    pthread_mutex_unlock(&g_print);
    return NULL;
  }
  if ((r = cu.dtoh_async(me->out, out, job.n_out * sizeof(float), stream)) || (r = cu.stream_sync(stream)) ||
      (r = cu.stream_destroy(stream)) || (r = cu.free_(out)) || (ws && (r = cu.free_(ws)))) {
    cu_failed("copying back", r);
    return NULL;
  }
  me->status = 0;
  return NULL;
}

static int upload(dptr* d, const float* host, size_t n) {
  int r;
  if ((r = cu.alloc(d, n * sizeof *host)) || (r = cu.htod(*d, host, n * sizeof *host))) return cu_failed("upload", r);
  return 0;
}

int main(int argc, char** argv) {
  int threads;
  const char* input;
  size_t n_in;
  if (argc == 8 && !strcmp(argv[1], "model")) {
    input = argv[3];
    job.batch = atoi(argv[4]), job.h = atoi(argv[5]), job.w_ = atoi(argv[6]), threads = atoi(argv[7]);
    n_in = (size_t)job.batch * 3 * job.h * job.w_;
  } else if (argc == 9 && !strcmp(argv[1], "head")) {
    job.head = 1;
    input = argv[2];
    job.batch = atoi(argv[3]), job.h = atoi(argv[4]), job.w_ = atoi(argv[5]), job.c = atoi(argv[6]);
    job.n = atoi(argv[7]), threads = atoi(argv[8]);
    n_in = (size_t)job.batch * job.h * job.w_ * job.c + (size_t)job.n * job.c + (size_t)job.n;
  } else {
    fprintf(stderr, "usage: hosted model MODEL.nvk INPUT B H W THREADS | hosted head INPUT B H W C N THREADS\n");
    return 2;
  }
  if (threads < 1 || threads > 64) return die("THREADS must be 1 to 64", NULL);
  float* host = read_floats(input, n_in);
  if (!host) return die("cannot read", input);
  if (open_driver()) return 1;
  if (job.head) {
    size_t nx = (size_t)job.batch * job.h * job.w_ * job.c;
    if (upload(&job.x, host, nx) || upload(&job.w, host + nx, (size_t)job.n * job.c) ||
        upload(&job.b, host + nx + (size_t)job.n * job.c, (size_t)job.n))
      return 1;
    job.n_out = (size_t)job.batch * job.n;
  } else {
    nvk_model_info info;
    if (nvk_model_load(argv[2], 0, &job.model) || nvk_model_get_info(job.model, &info))
      return die("nvk_model_load", nvk_last_error());
    if (info.dtype != NVK_F32 || !info.n_classes) return die("the model must be fp32 with a head", NULL);
    job.n_out = (size_t)job.batch * info.n_classes;
    if (!(job.ws_bytes = nvk_model_workspace_size(job.model, job.batch, job.h, job.w_, 0)))
      return die("nvk_model_workspace_size", nvk_last_error());
    if (upload(&job.x, host, n_in)) return 1;
  }
  worker_t* workers = (worker_t*)calloc((size_t)threads, sizeof *workers);
  pthread_t* ids = (pthread_t*)calloc((size_t)threads, sizeof *ids);
  if (!workers || !ids) return die("out of memory", NULL);
  pthread_barrier_init(&g_start, NULL, (unsigned)threads);
  for (int t = 0; t < threads; ++t) {
    workers[t].index = t;
    if (!(workers[t].out = (float*)malloc(job.n_out * sizeof(float)))) return die("out of memory", NULL);
    if (pthread_create(&ids[t], NULL, work, &workers[t])) return die("pthread_create failed", NULL);
  }
  int failed = 0;
  for (int t = 0; t < threads; ++t) {
    pthread_join(ids[t], NULL);
    failed |= workers[t].status;
  }
  if (failed) return 1;
  for (int t = 0; t < threads; ++t) {
    printf("%d", t);
    for (size_t i = 0; i < job.n_out; ++i) printf(" %.9g", workers[t].out[i]);
    printf("\n");
    free(workers[t].out);
  }
  if (job.model) nvk_model_free(job.model);
  int r;
  if ((r = cu.free_(job.x)) || (job.w && (r = cu.free_(job.w))) || (job.b && (r = cu.free_(job.b))) ||
      (r = cu.release(0)))
    return cu_failed("cleaning up", r);
  pthread_barrier_destroy(&g_start);
  free(workers);
  free(ids);
  free(host);
  return 0;
}
