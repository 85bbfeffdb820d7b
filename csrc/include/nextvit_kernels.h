/* nextvit_kernels: C API of the fused Next-ViT kernels (ahead-of-time compiled Triton
 * kernels launched through the CUDA driver API; see csrc/README.md).
 *
 * Conventions: activations NHWC contiguous; weights contiguous in the fused Plan's shapes
 * (conv3x3 [O,I,3,3], 1x1 and linear [O,I], mhca conv_w [C,32,3,3]); all pointers are
 * device pointers, 16-byte aligned; `stream` is a CUstream / cudaStream_t passed as void*
 * (NULL: the legacy default stream). Devices: a call launches in its stream's context (pushed
 * for the call when another is current; the caller's current context is unchanged), the
 * default streams (NULL, legacy, per-thread) in the current context; every device pointer must
 * be on that context's device, else NVK_ERR_INVALID. Launches never allocate or synchronize
 * (CUDA-graph capturable once the kernels are loaded in the context: nvk_load, or any first
 * call, does that and must happen outside a capture).
 * Scratch memory comes from `workspace` (E-MHSA; MLP outputs wider than 256 channels; MHCA on few pixels). The compiled kernels need no
 * Triton global/profile scratch (checked when the library is generated).
 * Every function returns NVK_OK or an error code; nvk_last_error() then says why. */
#ifndef NEXTVIT_KERNELS_H
#define NEXTVIT_KERNELS_H

#include <stddef.h>

#if defined(_WIN32)
#define NVK_API __declspec(dllexport)
#else
#define NVK_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { NVK_F32 = 0, NVK_F16 = 1, NVK_BF16 = 2 } nvk_dtype;
typedef enum { NVK_OK = 0, NVK_ERR_INVALID = 1, NVK_ERR_UNSUPPORTED = 2, NVK_ERR_CUDA = 3, NVK_ERR_NO_DRIVER = 4 } nvk_status;

NVK_API const char* nvk_last_error(void);      /* thread-local message of the last failure */
NVK_API const char* nvk_version(void);
/* Loads every kernel into the stream's CUDA context (a default stream: the current context, else
 * device 0's primary one); later launches in that context only launch. Idempotent; every op
 * function does it on first use. */
NVK_API nvk_status nvk_load(void* stream);
/* The AOT manifest embedded in this library (JSON, python -m nextvit_kernels.aot): every kernel's
 * Triton signature, constexprs, parameters and image hashes, and the shape-class table. */
NVK_API const char* nvk_manifest(void);
/* Forgets the CUDA driver and the kernels loaded in every context; the next call opens the driver
 * again: libcuda.so.1, or the library that $NEXTVIT_CUDA_DRIVER names (nothing else is tried then;
 * nextvit_kernels.testing.cpu_driver points it at a CPU stand-in). No call may be in flight. */
NVK_API nvk_status nvk_reset_driver(void);

NVK_API nvk_status nvk_conv_bn_relu(const void* x, const void* w, const void* b, void* out, int batch, int h, int w_, int c_in, int c_out, int stride, nvk_dtype dt, void* stream);
NVK_API nvk_status nvk_patch_embed(const void* x, const void* w, const void* b, void* out, int batch, int h, int w_, int c_in, int c_out, int stride, nvk_dtype dt, void* stream);
/* Below a few thousand pixels (batch*h*w) MHCA runs as two kernels through `workspace`; the size
 * covers every call with at most batch*h*w pixels (0: none needed, workspace may be NULL). */
NVK_API size_t nvk_mhca_workspace_size(int batch, int h, int w_, int c, int c_out, int residual, nvk_dtype dt);
NVK_API nvk_status nvk_mhca(const void* x, const void* conv_w, const void* conv_b, const void* proj_w, void* out, void* workspace, int batch, int h, int w_, int c, int c_out, int residual, nvk_dtype dt, void* stream);
/* Outputs wider than 256 channels run fc1 into `workspace` ([M, hidden]), then fc2; the size is 0
 * (workspace may be NULL) when the shape runs as one kernel, and 0 for an unsupported shape. */
NVK_API size_t nvk_mlp_workspace_size(int batch, int h, int w_, int c1, int c2, int hidden, int c_out, int residual, nvk_dtype dt);
NVK_API nvk_status nvk_mlp(const void* x, const void* x2 /* NULL: no concat */, const void* fc1_w, const void* fc1_b, const void* fc2_w, const void* fc2_b, void* out, void* workspace, int batch, int h, int w_, int c1, int c2, int hidden, int c_out, int residual, nvk_dtype dt, void* stream);
/* k|v of the key tokens, the pooled tokens (sr_ratio > 1) and, for c_out > 256 (three kernels),
 * the [batch*h*w, c] attention output; 0 for a shape with no compiled kernel. */
NVK_API size_t nvk_e_mhsa_workspace_size(int batch, int h, int w_, int c, int c_out, int sr_ratio, int head_dim, int residual, nvk_dtype dt);
NVK_API nvk_status nvk_e_mhsa(const void* x, const void* q_w, const void* q_b, const void* k_w, const void* k_b, const void* v_w, const void* v_b, const void* proj_w, const void* proj_b, void* out, void* workspace, int batch, int h, int w_, int c, int c_out, int sr_ratio, int head_dim, int residual, nvk_dtype dt, void* stream);
NVK_API nvk_status nvk_head(const void* x, const void* w, const void* b, void* out, int batch, int h, int w_, int c, int n_classes, nvk_dtype dt, void* stream);

/* ------------------------------------------------------------------ the whole model
 * A model file (nextvit_kernels.save_runtime, or python -m nextvit_kernels.aot --export) holds the
 * BatchNorm-folded weights of one Next-ViT in one dtype and its plan (safetensors; the plan is
 * also stored as a fixed-layout int64 table, which is what this library reads: no JSON here).
 * Load uploads the weights once (the only allocation); a forward walks the plan with the AOT
 * kernels through the caller's workspace: no allocation, no synchronization (CUDA-graph
 * capturable once loaded), O(1) checks, and safe from several threads with separate workspaces.
 * Images are [batch, 3, h, w] NCHW-contiguous (NVK_NCHW, what image preprocessing gives) or
 * [batch, h, w, 3] (NVK_NHWC) in the model's dtype; the stem reads either layout directly. Logits
 * are [batch, n_classes]; stage features [batch, h_s, w_s, c_s] NHWC at strides 4, 8, 16, 32. */
#define NVK_MODEL_ABI_VERSION 1  /* the model-file plan layout this library reads */
typedef enum { NVK_NCHW = 0, NVK_NHWC = 1 } nvk_layout;
typedef struct nvk_model nvk_model;

typedef struct {
  nvk_dtype dtype;
  int n_steps;          /* fused ops, head excluded */
  int n_classes;        /* 0: a backbone without a head (forward_features only) */
  int in_channels;      /* 3 */
  int feature_channels[4];
  int has_stage_norms;  /* features are normalized in line (detection/segmentation backbones) */
  size_t weight_bytes;  /* device memory the weights use */
} nvk_model_info;

/* Loads a model file onto `device` (its primary context, the one the CUDA runtime, torch and CuPy
 * use): parses and checks every byte, then allocates and uploads the weights. *model is NULL on
 * failure. device NVK_NO_DEVICE: parses and checks only, needing no driver; info, workspace sizes
 * and output shapes are answered, a forward is refused (a server validating a file before
 * placing it). */
#define NVK_NO_DEVICE (-1)
NVK_API nvk_status nvk_model_load(const char* path, int device, nvk_model** model);
NVK_API nvk_status nvk_model_load_memory(const void* data, size_t size, int device, nvk_model** model);
NVK_API void nvk_model_free(nvk_model* model); /* NULL: nothing */
NVK_API nvk_status nvk_model_get_info(const nvk_model* model, nvk_model_info* info);
/* Device workspace bytes a forward (features = 0) or a forward_features (1) of this input size
 * needs; 0 with nvk_last_error() set when the size cannot run (too small, a shape class not
 * compiled). */
NVK_API size_t nvk_model_workspace_size(const nvk_model* model, int batch, int h, int w_, int features);
/* dims of output `which` (-1: logits [batch, n_classes], 0..3: stage features, NHWC): *ndim 2 or 4. */
NVK_API nvk_status nvk_model_output_shape(const nvk_model* model, int batch, int h, int w_, int which, int dims[4],
                                          int* ndim);
NVK_API nvk_status nvk_model_forward(const nvk_model* model, const void* x, nvk_layout layout, void* out,
                                     void* workspace, size_t workspace_bytes, int batch, int h, int w_, void* stream);
/* features[s]: the four stage outputs, each of nvk_model_output_shape(..., s, ...). */
NVK_API nvk_status nvk_model_forward_features(const nvk_model* model, const void* x, nvk_layout layout,
                                              void* const features[4], void* workspace, size_t workspace_bytes,
                                              int batch, int h, int w_, void* stream);

#ifdef __cplusplus
}
#endif
#endif /* NEXTVIT_KERNELS_H */
