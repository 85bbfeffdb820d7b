// nextvit_kernels._C: thin pybind11 binding of the C API (csrc/include/nextvit_kernels.h).
// Pointers and streams are Python ints (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream);
// every function returns the nvk_status code; last_error() gives the message.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "nextvit_kernels.h"

namespace py = pybind11;

static const void* P(std::uintptr_t p) { return reinterpret_cast<const void*>(p); }
static void* M(std::uintptr_t p) { return reinterpret_cast<void*>(p); }
static nvk_dtype D(int d) { return static_cast<nvk_dtype>(d); }

PYBIND11_MODULE(_C, m) {
  m.doc() = "nextvit_kernels C library (AOT-compiled Triton kernels launched through the CUDA driver API)";
  py::enum_<nvk_status>(m, "Status")
      .value("OK", NVK_OK).value("ERR_INVALID", NVK_ERR_INVALID).value("ERR_UNSUPPORTED", NVK_ERR_UNSUPPORTED)
      .value("ERR_CUDA", NVK_ERR_CUDA).value("ERR_NO_DRIVER", NVK_ERR_NO_DRIVER).export_values();
  m.attr("F32") = static_cast<int>(NVK_F32);
  m.attr("F16") = static_cast<int>(NVK_F16);
  m.attr("BF16") = static_cast<int>(NVK_BF16);
  m.def("last_error", [] { return std::string(nvk_last_error()); });
  m.def("version", [] { return std::string(nvk_version()); });
  py::call_guard<py::gil_scoped_release> nogil;
  m.def("conv_bn_relu", [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t b, std::uintptr_t out, int batch, int h,
                           int w_, int c_in, int c_out, int stride, int dt, std::uintptr_t stream) {
          return static_cast<int>(nvk_conv_bn_relu(P(x), P(w), P(b), M(out), batch, h, w_, c_in, c_out, stride, D(dt), M(stream)));
        }, nogil);
  m.def("patch_embed", [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t b, std::uintptr_t out, int batch, int h,
                          int w_, int c_in, int c_out, int stride, int dt, std::uintptr_t stream) {
          return static_cast<int>(nvk_patch_embed(P(x), P(w), P(b), M(out), batch, h, w_, c_in, c_out, stride, D(dt), M(stream)));
        }, nogil);
  m.def("mhca_workspace_size", [](int batch, int h, int w_, int c, int c_out, int residual, int dt) {
    return nvk_mhca_workspace_size(batch, h, w_, c, c_out, residual, D(dt));
  });
  m.def("mhca", [](std::uintptr_t x, std::uintptr_t cw, std::uintptr_t cb, std::uintptr_t pw, std::uintptr_t out,
                   std::uintptr_t ws, int batch, int h, int w_, int c, int c_out, int residual, int dt,
                   std::uintptr_t stream) {
          return static_cast<int>(nvk_mhca(P(x), P(cw), P(cb), P(pw), M(out), M(ws), batch, h, w_, c, c_out, residual,
                                            D(dt), M(stream)));
        }, nogil);
  m.def("mlp_workspace_size", [](int batch, int h, int w_, int c1, int c2, int hidden, int c_out, int residual,
                                 int dt) {
    return nvk_mlp_workspace_size(batch, h, w_, c1, c2, hidden, c_out, residual, D(dt));
  });
  m.def("mlp", [](std::uintptr_t x, std::uintptr_t x2, std::uintptr_t w1, std::uintptr_t b1, std::uintptr_t w2,
                  std::uintptr_t b2, std::uintptr_t out, std::uintptr_t ws, int batch, int h, int w_, int c1, int c2,
                  int hidden, int c_out, int residual, int dt, std::uintptr_t stream) {
          return static_cast<int>(nvk_mlp(P(x), P(x2), P(w1), P(b1), P(w2), P(b2), M(out), M(ws), batch, h, w_, c1, c2,
                                           hidden, c_out, residual, D(dt), M(stream)));
        }, nogil);
  m.def("e_mhsa_workspace_size", [](int batch, int h, int w_, int c, int c_out, int sr, int head_dim, int residual,
                                    int dt) {
    return nvk_e_mhsa_workspace_size(batch, h, w_, c, c_out, sr, head_dim, residual, D(dt));
  });
  m.def("e_mhsa", [](std::uintptr_t x, std::uintptr_t qw, std::uintptr_t qb, std::uintptr_t kw, std::uintptr_t kb,
                     std::uintptr_t vw, std::uintptr_t vb, std::uintptr_t pw, std::uintptr_t pb, std::uintptr_t out,
                     std::uintptr_t ws, int batch, int h, int w_, int c, int c_out, int sr, int head_dim, int residual,
                     int dt, std::uintptr_t stream) {
          return static_cast<int>(nvk_e_mhsa(P(x), P(qw), P(qb), P(kw), P(kb), P(vw), P(vb), P(pw), P(pb), M(out), M(ws),
                                              batch, h, w_, c, c_out, sr, head_dim, residual, D(dt), M(stream)));
        }, nogil);
  m.def("head", [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t b, std::uintptr_t out, int batch, int h, int w_,
                   int c, int n, int dt, std::uintptr_t stream) {
          return static_cast<int>(nvk_head(P(x), P(w), P(b), M(out), batch, h, w_, c, n, D(dt), M(stream)));
        }, nogil);
}
