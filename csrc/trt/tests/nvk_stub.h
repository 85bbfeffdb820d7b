/* Recording stub of the nextvit_kernels C library (csrc/include/nextvit_kernels.h) for the
 * plugins' CPU contract test: every nvk_* function records its arguments and launches
 * nothing. Recording uses fixed storage only, so it does not disturb the harness's count of
 * heap allocations during enqueue. */
#ifndef NEXTVIT_TRT_NVK_STUB_H
#define NEXTVIT_TRT_NVK_STUB_H

#include "nextvit_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct
{
    char const* fn;          /* "nvk_mhca", "nvk_mhca_workspace_size", "nvk_load", ... */
    void const* ptrs[12];    /* the pointer arguments in order (tensors, then out); workspace apart */
    int nb_ptrs;
    long long ints[10];      /* the int arguments in order (batch, h, w, channels, fields) */
    int nb_ints;
    int dtype;               /* nvk_dtype, -1 for nvk_load */
    void* workspace;
    void* stream;
} nvk_stub_call;

NVK_API int nvk_stub_nb_calls(void);
NVK_API nvk_stub_call const* nvk_stub_last_call(void);
NVK_API void nvk_stub_reset(void);
/* The next op call (not a workspace-size query) fails with `status` and nvk_last_error() `message`. */
NVK_API void nvk_stub_fail_next(nvk_status status, char const* message);
/* The stand-in workspace size the stub's nvk_*_workspace_size returns (0 for an op without workspace). */
NVK_API size_t nvk_stub_workspace_size(char const* op, long long const* ints, int nb_ints, nvk_dtype dt);

#ifdef __cplusplus
}
#endif
#endif /* NEXTVIT_TRT_NVK_STUB_H */
