/* Internal declarations shared by the C library's sources (nextvit_kernels.c: driver, contexts,
 * shape classes, launches, the per-op entry points; nvk_model.c: the whole-model runtime). None of
 * it is exported: the API is nextvit_kernels.h. */
#ifndef NVK_INTERNAL_H
#define NVK_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "nextvit_kernels.h"
#include "nvk_table.h"

/* ------------------------------------------------------------------ driver API subset */
typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st* CUcontext;
typedef struct CUmod_st* CUmodule;
typedef struct CUfunc_st* CUfunction;
typedef struct CUstream_st* CUstream;
typedef unsigned long long CUdeviceptr;
#define CUDA_SUCCESS 0
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR 75
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR 76
#define CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN 97
#define CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES 1
#define CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES 8
#define CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL 9
#define CU_STREAM_LEGACY ((uintptr_t)0x1)
#define CU_STREAM_PER_THREAD ((uintptr_t)0x2)

typedef struct {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuDriverGetVersion)(int*);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuCtxGetDevice)(CUdevice*);
  CUresult (*cuCtxPushCurrent)(CUcontext);
  CUresult (*cuCtxPopCurrent)(CUcontext*);
  CUresult (*cuStreamGetCtx)(CUstream, CUcontext*);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuFuncSetAttribute)(CUfunction, int, int);
  CUresult (*cuFuncGetAttribute)(int*, int, CUfunction);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, CUstream, void**, void**);
  CUresult (*cuPointerGetAttribute)(void*, int, CUdeviceptr);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  CUresult (*cuMemAlloc)(CUdeviceptr*, size_t);
  CUresult (*cuMemFree)(CUdeviceptr);
  CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void*, size_t);
} nvk_driver_t;

extern nvk_driver_t nvki_drv;  /* filled when the driver is opened */

typedef struct {
  CUfunction fn;
  int shared;        /* dynamic shared memory bytes of the chosen image */
  int shared_ok;     /* the device allows that much */
  CUresult err;      /* load error for this kernel (0: fine) */
} nvk_loaded_t;

typedef struct nvk_ctx_s {
  CUcontext ctx;
  CUdevice dev;      /* its device's ordinal: device pointers of a call must be on it */
  int cc;
  int shared_optin;
  nvk_loaded_t* k;   /* nvk_num_kernels entries */
  struct nvk_ctx_s* next;
} nvk_ctx_t;

/* One entry-point call: the context it launches in, and whether enter() pushed it. */
typedef struct {
  nvk_ctx_t* c;
  int pushed;        /* leave() pops it, so the caller's current context is back */
  int default_stream;
} nvk_call_t;

/* A device pointer argument of a call, by name (NULL: absent or unused, not checked). */
typedef struct {
  const char* name;
  const void* p;
} nvk_dptr_t;
#define DEV(p) {#p, (const void*)(p)}
#define NDEV(a) ((int)(sizeof(a) / sizeof *(a)))

/* Errors: the thread-local message nvk_last_error() returns. */
nvk_status nvki_fail(nvk_status st, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
nvk_status nvki_cu_fail(CUresult r, const char* what);
void nvki_ok(void);

/* Calls: the context a call launches in (nextvit_kernels.c get_context / enter) and its end. */
nvk_status nvki_get_context(void* stream, nvk_call_t* call);
nvk_status nvki_enter(const char* op, void* stream, const nvk_dptr_t* ptrs, int n, nvk_call_t* call);
nvk_status nvki_leave(nvk_call_t* call, nvk_status st);

extern const char* const nvki_op_names[NVK_NUM_OPS];
extern const char* const nvki_dt_names[3];
const nvk_shape_class_t* nvki_lookup(int op, int dt, const int* key, int nkey, long long probe);
nvk_status nvki_unsupported(int op, int dt, const int* key, int nkey, const char* key_desc);

/* The ops on checked arguments with their shape class resolved, in the call's context
 * (nextvit_kernels.c). conv: nchw = 1 reads an NCHW input (the stem; key[3] of its class). */
nvk_status nvki_run_conv(const nvk_ctx_t* cx, const nvk_shape_class_t* sc, const void* x, const void* w,
                         const void* b, void* out, int batch, int h, int w_, int c_in, int c_out, int stride,
                         int nchw, void* stream);
nvk_status nvki_run_patch_embed(const nvk_ctx_t* cx, const nvk_shape_class_t* sc, const void* x, const void* w,
                                const void* b, void* out, int batch, int h, int w_, int c_in, int c_out, int stride,
                                void* stream);
nvk_status nvki_run_mhca(const nvk_ctx_t* cx, const nvk_shape_class_t* sc, const void* x, const void* conv_w,
                         const void* conv_b, const void* proj_w, void* out, void* workspace, int batch, int h, int w_,
                         int c, int c_out, void* stream);
nvk_status nvki_run_mlp(const nvk_ctx_t* cx, const nvk_shape_class_t* sc, const void* x, const void* x2,
                        const void* fc1_w, const void* fc1_b, const void* fc2_w, const void* fc2_b, void* out,
                        void* workspace, int batch, int h, int w_, int c1, int c2, int hidden, int c_out,
                        void* stream);
nvk_status nvki_run_e_mhsa(const nvk_ctx_t* cx, const nvk_shape_class_t* sc, const void* x, const void* q_w,
                           const void* q_b, const void* k_w, const void* k_b, const void* v_w, const void* v_b,
                           const void* proj_w, const void* proj_b, void* out, void* workspace, int batch, int h,
                           int w_, int c, int c_out, int sr_ratio, int head_dim, nvk_dtype dt, void* stream);
nvk_status nvki_run_head(const nvk_ctx_t* cx, const nvk_shape_class_t* sc, const void* x, const void* w,
                         const void* b, void* out, int batch, int h, int w_, int c, int n_classes, void* stream);
/* Scratch bytes of one call of a resolved class (0: none). */
size_t nvki_mhca_scratch(const nvk_shape_class_t* sc, long long pixels, int c, nvk_dtype dt);
size_t nvki_mlp_scratch(const nvk_shape_class_t* sc, long long pixels, int hidden, nvk_dtype dt);
size_t nvki_e_mhsa_scratch(const nvk_shape_class_t* sc, int batch, int h, int w_, int c, int sr_ratio, nvk_dtype dt);

/* The whole-model runtime's needs of the driver (nextvit_kernels.c): a call in device `device`'s
 * primary context (pushed; nvki_leave pops it), and how many times the driver was reset (a model
 * loaded under an earlier driver must not be used). */
nvk_status nvki_enter_device(int device, nvk_call_t* call);
unsigned nvki_driver_generation(void);

static inline size_t elem_size(nvk_dtype dt) { return dt == NVK_F32 ? 4 : 2; }
static inline size_t align256(size_t v) { return (v + 255) & ~(size_t)255; }

/* ------------------------------------------------------------------ argument checks */
#define CHECK(cond, ...)                                \
  do {                                                  \
    if (!(cond)) return nvki_fail(NVK_ERR_INVALID, __VA_ARGS__); \
  } while (0)

static inline nvk_status nvki_check_ptr(const char* op, const char* name, const void* p) {
  if (!p) return nvki_fail(NVK_ERR_INVALID, "nvk_%s: %s is NULL", op, name);
  if ((uintptr_t)p % 16)
    return nvki_fail(NVK_ERR_INVALID, "nvk_%s: %s = %p is not 16-byte aligned (the compiled kernels assume it)", op,
                name, p);
  return NVK_OK;
}
#define PTR(op, p)                                       \
  do {                                                   \
    nvk_status s_ = nvki_check_ptr(op, #p, (const void*)(p)); \
    if (s_) return s_;                                   \
  } while (0)
#define POS(op, v) CHECK((v) > 0, "nvk_%s: %s must be positive, got %d", op, #v, (int)(v))
#define DT(op, dt)                                                                                       \
  CHECK((int)(dt) >= 0 && (int)(dt) <= 2, "nvk_%s: unknown dtype %d (NVK_F32=0, NVK_F16=1, NVK_BF16=2)", op, \
        (int)(dt))

static inline long long cdiv(long long a, long long b) { return (a + b - 1) / b; }

#endif
