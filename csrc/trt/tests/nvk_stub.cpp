/* Recording stub of the nextvit_kernels C library (see nvk_stub.h). */
#include "nvk_stub.h"

#include <cstring>
#include <initializer_list>

namespace
{
int gNbCalls = 0;
nvk_stub_call gLast{};
nvk_status gFailStatus = NVK_OK;
char gFailMessage[256] = "";
char gLastError[256] = "";

void record(char const* fn, std::initializer_list<void const*> ptrs, std::initializer_list<long long> ints, int dt,
    void* workspace, void* stream)
{
    nvk_stub_call c{};
    c.fn = fn;
    for (void const* p : ptrs)
    {
        c.ptrs[c.nb_ptrs++] = p;
    }
    for (long long v : ints)
    {
        c.ints[c.nb_ints++] = v;
    }
    c.dtype = dt;
    c.workspace = workspace;
    c.stream = stream;
    gLast = c;
    ++gNbCalls;
}

nvk_status opResult()
{
    nvk_status const st = gFailStatus;
    if (st != NVK_OK)
    {
        std::strncpy(gLastError, gFailMessage, sizeof(gLastError) - 1);
        gFailStatus = NVK_OK;
    }
    return st;
}

size_t elementSize(nvk_dtype dt)
{
    return dt == NVK_F32 ? 4 : 2;
}
} // namespace

extern "C"
{
int nvk_stub_nb_calls(void)
{
    return gNbCalls;
}

nvk_stub_call const* nvk_stub_last_call(void)
{
    return gNbCalls > 0 ? &gLast : nullptr;
}

void nvk_stub_reset(void)
{
    gNbCalls = 0;
    gLast = nvk_stub_call{};
    gFailStatus = NVK_OK;
}

void nvk_stub_fail_next(nvk_status status, char const* message)
{
    gFailStatus = status;
    std::strncpy(gFailMessage, message, sizeof(gFailMessage) - 1);
}

size_t nvk_stub_workspace_size(char const* op, long long const* v, int nb, nvk_dtype dt)
{
    // Stand-ins, monotone in every argument like the real sizes: [pixels, channels] scratch.
    if (nb < 5)
    {
        return 0;
    }
    size_t const pixels = static_cast<size_t>(v[0] * v[1] * v[2]);
    if (std::strcmp(op, "nvk_mhca") == 0)
    {
        return pixels * static_cast<size_t>(v[3]) * elementSize(dt);
    }
    if (std::strcmp(op, "nvk_mlp") == 0)
    {
        return pixels * static_cast<size_t>(v[5]) * elementSize(dt);
    }
    if (std::strcmp(op, "nvk_e_mhsa") == 0)
    {
        return pixels * static_cast<size_t>(v[3] + v[4]) * elementSize(dt) + static_cast<size_t>(v[5]);
    }
    return 0;
}

char const* nvk_last_error(void)
{
    return gLastError;
}

char const* nvk_version(void)
{
    return "contract-stub";
}

nvk_status nvk_load(void* stream)
{
    record("nvk_load", {}, {}, -1, nullptr, stream);
    return NVK_OK;
}

nvk_status nvk_conv_bn_relu(const void* x, const void* w, const void* b, void* out, int batch, int h, int w_, int c_in,
    int c_out, int stride, nvk_dtype dt, void* stream)
{
    record("nvk_conv_bn_relu", {x, w, b, out}, {batch, h, w_, c_in, c_out, stride}, dt, nullptr, stream);
    return opResult();
}

nvk_status nvk_patch_embed(const void* x, const void* w, const void* b, void* out, int batch, int h, int w_, int c_in,
    int c_out, int stride, nvk_dtype dt, void* stream)
{
    record("nvk_patch_embed", {x, w, b, out}, {batch, h, w_, c_in, c_out, stride}, dt, nullptr, stream);
    return opResult();
}

size_t nvk_mhca_workspace_size(int batch, int h, int w_, int c, int c_out, int residual, nvk_dtype dt)
{
    long long const v[] = {batch, h, w_, c, c_out, residual};
    record("nvk_mhca_workspace_size", {}, {batch, h, w_, c, c_out, residual}, dt, nullptr, nullptr);
    return nvk_stub_workspace_size("nvk_mhca", v, 6, dt);
}

nvk_status nvk_mhca(const void* x, const void* conv_w, const void* conv_b, const void* proj_w, void* out,
    void* workspace, int batch, int h, int w_, int c, int c_out, int residual, nvk_dtype dt, void* stream)
{
    record("nvk_mhca", {x, conv_w, conv_b, proj_w, out}, {batch, h, w_, c, c_out, residual}, dt, workspace, stream);
    return opResult();
}

size_t nvk_mlp_workspace_size(
    int batch, int h, int w_, int c1, int c2, int hidden, int c_out, int residual, nvk_dtype dt)
{
    long long const v[] = {batch, h, w_, c1, c2, hidden, c_out, residual};
    record("nvk_mlp_workspace_size", {}, {batch, h, w_, c1, c2, hidden, c_out, residual}, dt, nullptr, nullptr);
    return nvk_stub_workspace_size("nvk_mlp", v, 8, dt);
}

nvk_status nvk_mlp(const void* x, const void* x2, const void* fc1_w, const void* fc1_b, const void* fc2_w,
    const void* fc2_b, void* out, void* workspace, int batch, int h, int w_, int c1, int c2, int hidden, int c_out,
    int residual, nvk_dtype dt, void* stream)
{
    record("nvk_mlp", {x, x2, fc1_w, fc1_b, fc2_w, fc2_b, out}, {batch, h, w_, c1, c2, hidden, c_out, residual}, dt,
        workspace, stream);
    return opResult();
}

size_t nvk_e_mhsa_workspace_size(
    int batch, int h, int w_, int c, int c_out, int sr_ratio, int head_dim, int residual, nvk_dtype dt)
{
    long long const v[] = {batch, h, w_, c, c_out, sr_ratio, head_dim, residual};
    record("nvk_e_mhsa_workspace_size", {}, {batch, h, w_, c, c_out, sr_ratio, head_dim, residual}, dt, nullptr,
        nullptr);
    return nvk_stub_workspace_size("nvk_e_mhsa", v, 8, dt);
}

nvk_status nvk_e_mhsa(const void* x, const void* q_w, const void* q_b, const void* k_w, const void* k_b,
    const void* v_w, const void* v_b, const void* proj_w, const void* proj_b, void* out, void* workspace, int batch,
    int h, int w_, int c, int c_out, int sr_ratio, int head_dim, int residual, nvk_dtype dt, void* stream)
{
    record("nvk_e_mhsa", {x, q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b, out},
        {batch, h, w_, c, c_out, sr_ratio, head_dim, residual}, dt, workspace, stream);
    return opResult();
}

nvk_status nvk_head(const void* x, const void* w, const void* b, void* out, int batch, int h, int w_, int c,
    int n_classes, nvk_dtype dt, void* stream)
{
    record("nvk_head", {x, w, b, out}, {batch, h, w_, c, n_classes}, dt, nullptr, stream);
    return opResult();
}
}
