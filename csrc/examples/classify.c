/* nvk_classify: Next-ViT inference from C with nothing but libnextvit_kernels.so and the CUDA driver.
 *
 *   nvk_classify MODEL.nvk IMAGE.ppm [--iters N] [--device D]
 *   nvk_classify MODEL.nvk --random [--size HxW] [--batch B] [--iters N] [--device D]
 *
 * Loads a model file (nextvit_kernels.save_runtime, or python -m nextvit_kernels.aot --export),
 * reads a binary PPM (P6, 8-bit; any size the model takes, e.g. 224x224) or makes a random image,
 * normalizes it with the ImageNet mean and std into an NCHW batch in the model's dtype, runs
 * nvk_model_forward --iters times and prints the top-5 classes of the first image and the time per
 * forward. The device buffers come from the CUDA driver API (libcuda.so.1, opened at run time like
 * the library does; $NEXTVIT_CUDA_DRIVER names another, e.g. the CPU stand-in of
 * nextvit_kernels.testing: launches counted, the classes meaningless; with the variables of
 * testing.hosted_environment() every launch computed under Triton's interpreter). */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nextvit_kernels.h"

/* ------------------------------------------------------------------ the driver calls we need */
static struct {
  int (*init)(unsigned);
  int (*device_get)(int*, int);
  int (*primary_ctx_retain)(void**, int);
  int (*ctx_set_current)(void*);
  int (*mem_alloc)(unsigned long long*, size_t);
  int (*mem_free)(unsigned long long);
  int (*htod)(unsigned long long, const void*, size_t);
  int (*dtoh)(void*, unsigned long long, size_t);
  int (*ctx_synchronize)(void);
} cu;

static int die(const char* what) {
  fprintf(stderr, "nvk_classify: %s\n", what);
  return 1;
}

static int open_driver(int device) {
  const char* name = getenv("NEXTVIT_CUDA_DRIVER");
  void* h = dlopen(name && *name ? name : "libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!h) return die(dlerror());
  struct { void** slot; const char* sym; } syms[] = {
      {(void**)&cu.init, "cuInit"}, {(void**)&cu.device_get, "cuDeviceGet"},
      {(void**)&cu.primary_ctx_retain, "cuDevicePrimaryCtxRetain"}, {(void**)&cu.ctx_set_current, "cuCtxSetCurrent"},
      {(void**)&cu.mem_alloc, "cuMemAlloc_v2"}, {(void**)&cu.mem_free, "cuMemFree_v2"},
      {(void**)&cu.htod, "cuMemcpyHtoD_v2"}, {(void**)&cu.dtoh, "cuMemcpyDtoH_v2"},
      {(void**)&cu.ctx_synchronize, "cuCtxSynchronize"}};
  for (size_t i = 0; i < sizeof syms / sizeof *syms; ++i) {
    void* p = dlsym(h, syms[i].sym);
    if (!p) return die("the CUDA driver lacks an entry point it needs");
    memcpy(syms[i].slot, &p, sizeof p);
  }
  int d;
  void* ctx;
  if (cu.init(0) || cu.device_get(&d, device) || cu.primary_ctx_retain(&ctx, d) || cu.ctx_set_current(ctx))
    return die("no usable CUDA device");
  return 0;
}

/* ------------------------------------------------------------------ fp16 / bf16 */
static uint16_t to_half(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000, e = (x >> 23) & 0xff, m = x & 0x7fffff;
  if (e == 0xff) return (uint16_t)(sign | 0x7c00 | (m ? 0x200 : 0));
  int ee = (int)e - 127 + 15;
  if (ee >= 31) return (uint16_t)(sign | 0x7c00);
  if (ee <= 0) { /* subnormal half: round the shifted mantissa to nearest even */
    if (ee < -10) return (uint16_t)sign;
    m |= 0x800000;
    int shift = 14 - ee;
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = (uint32_t)ee << 10 | m >> 13, rem = m & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r; /* a carry into the exponent is right */
  return (uint16_t)(sign | r);
}

static float from_half(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, x;
  if (e == 0) {
    float f = ldexpf((float)m, -24);
    return sign ? -f : f;
  }
  x = sign | (e == 31 ? 0xff << 23 : (e - 15 + 127) << 23) | m << 13;
  float f;
  memcpy(&f, &x, 4);
  return f;
}

static uint16_t to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);
  return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

static float from_bf16(uint16_t b) {
  uint32_t x = (uint32_t)b << 16;
  float f;
  memcpy(&f, &x, 4);
  return f;
}

/* ------------------------------------------------------------------ PPM (P6, maxval <= 255) */
static int ppm_int(FILE* f, int* out) {
  int c = fgetc(f);
  for (;;) { /* whitespace and # comments before each header field */
    while (c == ' ' || c == '\t' || c == '\n' || c == '\r') c = fgetc(f);
    if (c != '#') break;
    while (c != '\n' && c != EOF) c = fgetc(f);
  }
  long v = 0;
  int digits = 0;
  while (c >= '0' && c <= '9' && digits < 6) {
    v = v * 10 + (c - '0');
    ++digits;
    c = fgetc(f);
  }
  if (!digits || (c != ' ' && c != '\t' && c != '\n' && c != '\r')) return -1; /* one whitespace ends it */
  *out = (int)v;
  return 0;
}

static unsigned char* read_ppm(const char* path, int* h, int* w) {
  FILE* f = fopen(path, "rb");
  if (!f) return NULL;
  unsigned char* px = NULL;
  int maxval;
  if (fgetc(f) == 'P' && fgetc(f) == '6' && !ppm_int(f, w) && !ppm_int(f, h) && !ppm_int(f, &maxval) && *w > 0 &&
      *h > 0 && *w <= 16384 && *h <= 16384 && maxval > 0 && maxval <= 255) {
    size_t n = (size_t)*w * (size_t)*h * 3;
    px = (unsigned char*)malloc(n);
    if (px && fread(px, 1, n, f) != n) {
      free(px);
      px = NULL;
    }
    for (size_t i = 0; px && i < n; ++i) px[i] = (unsigned char)(px[i] * 255 / maxval);
  }
  fclose(f);
  return px;
}

/* ------------------------------------------------------------------ main */
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int usage(void) {
  fprintf(stderr, "usage: nvk_classify MODEL.nvk (IMAGE.ppm | --random [--size HxW] [--batch B]) [--iters N] "
                  "[--device D]\n");
  return 2;
}

int main(int argc, char** argv) {
  if (argc < 3) return usage();
  const char* model_path = argv[1];
  const char* image = NULL;
  int random = 0, iters = 20, device = 0, batch = 1, h = 224, w = 224;
  for (int i = 2; i < argc; ++i) {
    const char* a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--random")) random = 1;
    else if (!strcmp(a, "--iters") && v) iters = atoi(argv[++i]);
    else if (!strcmp(a, "--device") && v) device = atoi(argv[++i]);
    else if (!strcmp(a, "--batch") && v) batch = atoi(argv[++i]);
    else if (!strcmp(a, "--size") && v) {
      if (sscanf(argv[++i], "%dx%d", &h, &w) != 2) return usage();
    } else if (a[0] != '-' && !image) image = a;
    else return usage();
  }
  if (random == (image != NULL) || iters < 1 || batch < 1 || h < 1 || w < 1 || device < 0) return usage();
  unsigned char* px = NULL;
  if (image) {
    batch = 1;
    if (!(px = read_ppm(image, &h, &w))) return die("cannot read the image (a binary P6 PPM, 8-bit)");
  }
  if (open_driver(device)) return 1;
  nvk_model* model = NULL;
  double t0 = now();
  if (nvk_model_load(model_path, device, &model)) return die(nvk_last_error());
  double t_load = now() - t0;
  nvk_model_info info;
  nvk_model_get_info(model, &info);
  if (!info.n_classes) return die("the model file has no head (a backbone): nothing to classify");
  size_t es = info.dtype == NVK_F32 ? 4 : 2, n_in = (size_t)batch * 3 * h * w, n_out = (size_t)batch * info.n_classes;
  size_t ws_bytes = nvk_model_workspace_size(model, batch, h, w, 0);
  if (!ws_bytes) return die(nvk_last_error());
  /* NCHW, normalized as the ImageNet-trained weights expect */
  static const float mean[3] = {0.485f, 0.456f, 0.406f}, std_[3] = {0.229f, 0.224f, 0.225f};
  unsigned char* host = (unsigned char*)malloc(n_in * es);
  unsigned char* logits = (unsigned char*)malloc(n_out * es);
  if (!host || !logits) return die("out of host memory");
  srand(1);
  for (size_t i = 0; i < n_in; ++i) {
    size_t c = i / ((size_t)h * w) % 3, p = i % ((size_t)h * w);
    float v = px ? (px[p * 3 + c] / 255.0f - mean[c]) / std_[c] : (float)rand() / RAND_MAX * 4.0f - 2.0f;
    if (info.dtype == NVK_F32) memcpy(host + 4 * i, &v, 4);
    else {
      uint16_t b = info.dtype == NVK_F16 ? to_half(v) : to_bf16(v);
      memcpy(host + 2 * i, &b, 2);
    }
  }
  unsigned long long x = 0, out = 0, ws = 0;
  if (cu.mem_alloc(&x, n_in * es) || cu.mem_alloc(&out, n_out * es) || cu.mem_alloc(&ws, ws_bytes) ||
      cu.htod(x, host, n_in * es))
    return die("device allocation or copy failed");
  nvk_status st = nvk_model_forward(model, (const void*)(uintptr_t)x, NVK_NCHW, (void*)(uintptr_t)out,
                                    (void*)(uintptr_t)ws, ws_bytes, batch, h, w, NULL); /* warm-up */
  if (st) return die(nvk_last_error());
  cu.ctx_synchronize();
  t0 = now();
  for (int i = 0; i < iters && !st; ++i)
    st = nvk_model_forward(model, (const void*)(uintptr_t)x, NVK_NCHW, (void*)(uintptr_t)out, (void*)(uintptr_t)ws,
                           ws_bytes, batch, h, w, NULL);
  if (st) return die(nvk_last_error());
  cu.ctx_synchronize();
  double per = (now() - t0) / iters;
  if (cu.dtoh(logits, out, n_out * es)) return die("copying the logits back failed");
  int top[5] = {-1, -1, -1, -1, -1};
  float best[5];
  for (int k = 0; k < info.n_classes; ++k) {
    float v;
    if (info.dtype == NVK_F32) memcpy(&v, logits + 4 * (size_t)k, 4);
    else {
      uint16_t b;
      memcpy(&b, logits + 2 * (size_t)k, 2);
      v = info.dtype == NVK_F16 ? from_half(b) : from_bf16(b);
    }
    if (v != v) continue; /* NaN never ranks */
    for (int j = 0; j < 5; ++j)
      if (top[j] < 0 || v > best[j]) {
        memmove(top + j + 1, top + j, (4 - j) * sizeof *top);
        memmove(best + j + 1, best + j, (4 - j) * sizeof *best);
        top[j] = k;
        best[j] = v;
        break;
      }
  }
  printf("model %s: %d fused ops, %s, %.1f MB of weights, loaded in %.1f ms\n", model_path, info.n_steps,
         info.dtype == NVK_F32 ? "fp32" : info.dtype == NVK_F16 ? "fp16" : "bf16", info.weight_bytes / 1e6,
         t_load * 1e3);
  printf("input %d x 3 x %d x %d (%s), workspace %.1f MB\n", batch, h, w, image ? image : "random", ws_bytes / 1e6);
  printf("top-5:");
  for (int j = 0; j < 5; ++j)
    if (top[j] >= 0) printf(" %d (%.3f)", top[j], best[j]);
  printf("\n%.3f ms per forward (mean of %d)\n", per * 1e3, iters);
  cu.mem_free(x);
  cu.mem_free(out);
  cu.mem_free(ws);
  nvk_model_free(model);
  free(host);
  free(logits);
  free(px);
  return 0;
}
