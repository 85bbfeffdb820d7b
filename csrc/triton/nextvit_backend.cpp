/* libtriton_nextvit.so: a Triton Inference Server backend that serves a Next-ViT model file
 * (model.nvk) through the whole-model C runtime (nvk_model_*, csrc/include/nextvit_kernels.h).
 *
 * One nvk_model per instance on its device, with the instance's own stream, input, output and
 * workspace buffers, sized for max_batch_size at the configured H x W (grown on demand when the
 * config leaves H and W at -1). A dynamic batch is gathered into one contiguous input, run with one
 * nvk_model_forward (and one nvk_model_forward_features when a request asks for the stage
 * maps), and each request gets exactly its own rows back. A request the model cannot run gets an
 * error response naming why; the other requests of the batch go on. Everything else about a model
 * (file, layout, outputs) is in csrc/triton/README.md.
 *
 * Device memory, streams and copies use the CUDA driver API of the library the C runtime opens
 * ($NEXTVIT_CUDA_DRIVER, else libcuda.so.1), so under the CPU stand-in of nextvit_kernels.testing
 * the whole server path runs on a machine without a GPU. */
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "nextvit_kernels.h"
#include "triton/core/tritonbackend.h"

namespace {

using json = nlohmann::json;
const char* const kOutputs[5] = {"logits", "features_0", "features_1", "features_2", "features_3"};

TRITONSERVER_Error* Error(TRITONSERVER_Error_Code code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
TRITONSERVER_Error* Error(TRITONSERVER_Error_Code code, const char* fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  return TRITONSERVER_ErrorNew(code, msg);
}
#define INVALID(...) Error(TRITONSERVER_ERROR_INVALID_ARG, __VA_ARGS__)
#define TRY(x)                                  \
  do {                                          \
    if (TRITONSERVER_Error* e_ = (x)) return e_; \
  } while (0)

/* The C library's messages name the function and what is wrong. */
TRITONSERVER_Error* Nvk(nvk_status st) {
  return st ? Error(st == NVK_ERR_INVALID ? TRITONSERVER_ERROR_INVALID_ARG : TRITONSERVER_ERROR_INTERNAL, "%s",
                    nvk_last_error())
            : nullptr;
}

uint64_t Now() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  uint32_t bits;
  if (e == 0x1f) {
    bits = sign | 0x7f800000 | (m << 13);  // inf, nan
  } else if (e) {
    bits = sign | ((e + 112) << 23) | (m << 13);
  } else {  // zero or subnormal: m * 2^-24
    const float f = float(m) * (1.0f / 16777216.0f);
    memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* ------------------------------------------------------------------ the CUDA driver calls */
typedef int CUresult;
typedef unsigned long long CUdeviceptr;
struct Driver {
  CUresult (*init)(unsigned);
  CUresult (*device_get)(int*, int);
  CUresult (*retain)(void**, int);
  CUresult (*release)(int);
  CUresult (*push)(void*);
  CUresult (*pop)(void**);
  CUresult (*stream_create)(void**, unsigned);
  CUresult (*stream_destroy)(void*);
  CUresult (*stream_sync)(void*);
  CUresult (*alloc)(CUdeviceptr*, size_t);
  CUresult (*free)(CUdeviceptr);
  CUresult (*htod)(CUdeviceptr, const void*, size_t, void*);
  CUresult (*dtoh)(void*, CUdeviceptr, size_t, void*);
  CUresult (*dtod)(CUdeviceptr, CUdeviceptr, size_t, void*);
  CUresult (*error_string)(CUresult, const char**);
} cu;
std::string driver_error;  // why the driver could not be opened ("" once it is)

void OpenDriver() {
  const char* name = getenv("NEXTVIT_CUDA_DRIVER");
  if (!name || !*name) name = "libcuda.so.1";
  void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    driver_error = std::string("cannot open the CUDA driver ") + name + ": " + dlerror();
    return;
  }
  const struct {
    void* slot;
    const char* sym;
  } syms[] = {{&cu.init, "cuInit"},
              {&cu.device_get, "cuDeviceGet"},
              {&cu.retain, "cuDevicePrimaryCtxRetain"},
              {&cu.release, "cuDevicePrimaryCtxRelease_v2"},
              {&cu.push, "cuCtxPushCurrent_v2"},
              {&cu.pop, "cuCtxPopCurrent_v2"},
              {&cu.stream_create, "cuStreamCreate"},
              {&cu.stream_destroy, "cuStreamDestroy_v2"},
              {&cu.stream_sync, "cuStreamSynchronize"},
              {&cu.alloc, "cuMemAlloc_v2"},
              {&cu.free, "cuMemFree_v2"},
              {&cu.htod, "cuMemcpyHtoDAsync_v2"},
              {&cu.dtoh, "cuMemcpyDtoHAsync_v2"},
              {&cu.dtod, "cuMemcpyDtoDAsync_v2"},
              {&cu.error_string, "cuGetErrorString"}};
  for (const auto& s : syms) {
    void* p = dlsym(h, s.sym);
    if (!p) {
      driver_error = std::string(name) + " has no " + s.sym;
      return;
    }
    memcpy(s.slot, &p, sizeof p);
  }
  if (CUresult r = cu.init(0)) driver_error = "cuInit failed with CUDA error " + std::to_string(r);
}

TRITONSERVER_Error* Cu(CUresult r, const char* what) {
  if (!r) return nullptr;
  const char* s = nullptr;
  cu.error_string(r, &s);
  return Error(TRITONSERVER_ERROR_INTERNAL, "%s: %s", what, s ? s : "unknown CUDA error");
}

/* Device memory that grows to the largest size asked for. */
struct Buffer {
  CUdeviceptr p = 0;
  size_t size = 0;
  TRITONSERVER_Error* Reserve(size_t bytes, const char* what) {
    if (bytes <= size) return nullptr;
    Free();
    TRY(Cu(cu.alloc(&p, bytes), what));
    size = bytes;
    return nullptr;
  }
  void Free() {
    if (p) cu.free(p);
    p = 0;
    size = 0;
  }
  char* at(size_t off) const { return reinterpret_cast<char*>(static_cast<uintptr_t>(p)) + off; }
};

/* ------------------------------------------------------------------ the model (config + file) */
struct ModelState {
  std::string name, file;
  /* The file, parsed and checked once when the model loads (NVK_NO_DEVICE: nothing uploaded); the
   * config's checks ask it, the instances load their own device copies. */
  nvk_model* checked = nullptr;
  nvk_model_info info{};
  nvk_layout layout = NVK_NCHW;
  int max_batch = 0;
  int64_t h = -1, w = -1;  // -1: any size the model runs
  std::string input = "images";
  TRITONSERVER_DataType dtype = TRITONSERVER_TYPE_FP32;
  bool output[5] = {false, false, false, false, false};  // logits, features_0..3 in the config
  /* Logits in FP32 from an FP16 model (converted on the host, n_classes values an image): Triton's
   * classification extension (class_count) takes no FP16. */
  bool logits_fp32 = false;
  int device_param = 0;  // KIND_MODEL's device (parameters.device)

  ~ModelState() { nvk_model_free(checked); }
};

int64_t Int(const json& v) {  // the config's int64 fields arrive as numbers or as strings
  return v.is_string() ? std::stoll(v.get<std::string>()) : v.get<int64_t>();
}

std::string Param(const json& config, const char* key, const std::string& fallback) {
  auto p = config.find("parameters");
  if (p == config.end() || !p->contains(key)) return fallback;
  return (*p)[key].value("string_value", fallback);
}

TRITONSERVER_Error* ReadConfig(TRITONBACKEND_Model* model, json* config) {
  TRITONSERVER_Message* msg;
  TRY(TRITONBACKEND_ModelConfig(model, 1, &msg));
  const char* buf;
  size_t size;
  TRITONSERVER_Error* err = TRITONSERVER_MessageSerializeToJson(msg, &buf, &size);
  if (!err) *config = json::parse(buf, buf + size, nullptr, false);
  TRITONSERVER_MessageDelete(msg);
  if (!err && config->is_discarded()) err = INVALID("the model configuration is not JSON");
  return err;
}

/* Fills what the config leaves out from the model file: the input, the logits output, the batch
 * size and dynamic batching; what the config states is kept (and checked later). */
void AutoComplete(const ModelState& s, json* config) {
  json& c = *config;
  if (!c.contains("max_batch_size") || Int(c["max_batch_size"]) == 0) c["max_batch_size"] = 64;
  const bool nhwc = Param(c, "layout", "NCHW") == "NHWC";
  if (!c.contains("input") || c["input"].empty())
    c["input"] = json::array({{{"name", "images"},
                               {"data_type", s.info.dtype == NVK_F16 ? "TYPE_FP16" : "TYPE_FP32"},
                               {"dims", nhwc ? json::array({-1, -1, 3}) : json::array({3, -1, -1})}}});
  if ((!c.contains("output") || c["output"].empty()) && s.info.n_classes)
    c["output"] = json::array({{{"name", "logits"}, {"data_type", "TYPE_FP32"},
                                {"dims", json::array({s.info.n_classes})}}});
  if (!c.contains("dynamic_batching") && !c.contains("sequence_batching")) c["dynamic_batching"] = json::object();
}

TRITONSERVER_Error* CheckConfig(ModelState* s, const json& c) {
  const char* n = s->name.c_str();
  if (s->info.dtype == NVK_BF16) return INVALID("%s: bf16 model files are not served (no Triton BF16 input)", n);
  s->dtype = s->info.dtype == NVK_F16 ? TRITONSERVER_TYPE_FP16 : TRITONSERVER_TYPE_FP32;
  const char* type = s->dtype == TRITONSERVER_TYPE_FP16 ? "TYPE_FP16" : "TYPE_FP32";
  s->max_batch = c.contains("max_batch_size") ? static_cast<int>(Int(c["max_batch_size"])) : 0;
  if (s->max_batch < 1) return INVALID("%s: max_batch_size must be >= 1 (the backend batches)", n);
  const std::string layout = Param(c, "layout", "NCHW");
  if (layout != "NCHW" && layout != "NHWC") return INVALID("%s: parameters.layout is %s (NCHW or NHWC)", n, layout.c_str());
  s->layout = layout == "NHWC" ? NVK_NHWC : NVK_NCHW;
  if (!c.contains("input") || c["input"].size() != 1) return INVALID("%s: the model has one input (images)", n);
  const json& in = c["input"][0];
  s->input = in.value("name", "");
  if (in.value("data_type", "") != type)
    return INVALID("%s: input %s is %s, the model file is %s", n, s->input.c_str(),
                   in.value("data_type", "?").c_str(), type);
  std::vector<int64_t> d;
  for (const auto& v : in.value("dims", json::array())) d.push_back(Int(v));
  const int ci = s->layout == NVK_NHWC ? 2 : 0;
  if (d.size() != 3 || d[ci] != s->info.in_channels)
    return INVALID("%s: input dims must be %s with C = %d", n, s->layout == NVK_NHWC ? "[H, W, C]" : "[C, H, W]",
                   s->info.in_channels);
  s->h = d[s->layout == NVK_NHWC ? 0 : 1];
  s->w = d[s->layout == NVK_NHWC ? 1 : 2];
  if ((s->h == -1) != (s->w == -1) || s->h == 0 || s->w == 0 || s->h < -1 || s->w < -1)
    return INVALID("%s: input H and W must both be positive or both -1", n);
  if (s->h > 0 && s->info.n_classes &&
      !nvk_model_workspace_size(s->checked, 1, static_cast<int>(s->h), static_cast<int>(s->w), 0))
    return INVALID("%s: the model cannot run %lld x %lld: %s", n, (long long)s->h, (long long)s->w, nvk_last_error());
  for (const auto& o : c.value("output", json::array())) {
    const std::string on = o.value("name", "");
    int which = -1;
    for (int i = 0; i < 5; ++i)
      if (on == kOutputs[i]) which = i;
    if (which < 0) return INVALID("%s: unknown output %s (logits, features_0 .. features_3)", n, on.c_str());
    if (which == 0 && !s->info.n_classes) return INVALID("%s: the model file has no head: no logits", n);
    const std::string ot = o.value("data_type", "");
    if (which == 0 && ot == "TYPE_FP32") {
      s->logits_fp32 = s->dtype == TRITONSERVER_TYPE_FP16;
    } else if (ot != type) {
      return INVALID("%s: output %s must be %s%s", n, on.c_str(), type, which == 0 ? " or TYPE_FP32" : "");
    }
    s->output[which] = true;
  }
  s->device_param = std::stoi(Param(c, "device", "0"));
  return nullptr;
}

TRITONSERVER_Error* InitModel(TRITONBACKEND_Model* model, ModelState* s) {
  const char* name;
  TRY(TRITONBACKEND_ModelName(model, &name));
  s->name = name;
  uint64_t version;
  TRY(TRITONBACKEND_ModelVersion(model, &version));
  TRITONBACKEND_ArtifactType type;
  const char* dir;
  TRY(TRITONBACKEND_ModelRepository(model, &type, &dir));
  if (type != TRITONBACKEND_ARTIFACT_FILESYSTEM) return INVALID("%s: the repository must be a filesystem", name);
  json config;
  TRY(ReadConfig(model, &config));
  const std::string file = Param(config, "model_file", "model.nvk");
  s->file = file[0] == '/' ? file : std::string(dir) + "/" + std::to_string(version) + "/" + file;
  TRY(Nvk(nvk_model_load(s->file.c_str(), NVK_NO_DEVICE, &s->checked)));  // every byte, before any instance
  nvk_model_get_info(s->checked, &s->info);
  bool auto_complete = false;
  TRY(TRITONBACKEND_ModelAutoCompleteConfig(model, &auto_complete));
  if (auto_complete) {
    AutoComplete(*s, &config);
    const std::string text = config.dump();
    TRITONSERVER_Message* msg;
    TRY(TRITONSERVER_MessageNewFromSerializedJson(&msg, text.data(), text.size()));
    TRITONSERVER_Error* err = TRITONBACKEND_ModelSetConfig(model, 1, msg);
    TRITONSERVER_MessageDelete(msg);
    TRY(err);
    TRY(ReadConfig(model, &config));
  }
  try {
    return CheckConfig(s, config);
  } catch (const std::exception& e) {  // a field of another type than the config schema's
    return INVALID("%s: bad model configuration: %s", name, e.what());
  }
}

/* ------------------------------------------------------------------ an instance */
struct Instance {
  ModelState* model = nullptr;
  int device = 0, cudev = 0;  // the ordinal, and the driver's handle of it
  void* ctx = nullptr;
  void* stream = nullptr;
  nvk_model* nvk = nullptr;
  Buffer input, workspace, out[5];
  std::vector<char> host;       // the outputs on their way to the responses
  std::vector<float> widened;   // FP16 logits of one request as FP32

  ~Instance() {
    if (ctx && !cu.push(ctx)) {
      input.Free();
      workspace.Free();
      for (auto& b : out) b.Free();
      if (stream) cu.stream_destroy(stream);
      void* popped;
      cu.pop(&popped);
    }
    nvk_model_free(nvk);
    if (ctx) cu.release(cudev);
  }

  bool Features() const { return model->output[1] || model->output[2] || model->output[3] || model->output[4]; }
  size_t Elem() const { return model->dtype == TRITONSERVER_TYPE_FP16 ? 2 : 4; }

  /* Buffers for `batch` images of h x w (the instance's current context). Every size grows with the
   * batch, so buffers that hold more images of the same size hold these: no plan walk per batch. */
  TRITONSERVER_Error* Reserve(int batch, int h, int w) {
    if (h == fits_h && w == fits_w && batch <= fits_batch) return nullptr;
    size_t ws = 0;
    for (int f = 0; f < 2; ++f) {
      if (f == 0 && !model->output[0]) continue;
      if (f == 1 && !Features()) continue;
      size_t need = nvk_model_workspace_size(nvk, batch, h, w, f);
      if (!need) return INVALID("the model cannot run %d x %d images: %s", h, w, nvk_last_error());
      ws = std::max(ws, need);
    }
    TRY(input.Reserve(size_t(batch) * h * w * model->info.in_channels * Elem(), "input buffer"));
    TRY(workspace.Reserve(ws, "workspace"));
    for (int o = 0; o < 5; ++o)  // the runtime writes all four stage maps when one is asked for
      if (o == 0 ? model->output[0] : Features()) TRY(out[o].Reserve(OutputBytes(o, batch, h, w), kOutputs[o]));
    fits_batch = h == fits_h && w == fits_w ? std::max(fits_batch, batch) : batch;
    fits_h = h;
    fits_w = w;
    return nullptr;
  }
  int fits_batch = 0, fits_h = 0, fits_w = 0;  // what the buffers were last sized for

  size_t OutputBytes(int o, int batch, int h, int w, std::vector<int64_t>* shape = nullptr) const {
    int dims[4], nd = 0;
    if (nvk_model_output_shape(nvk, batch, h, w, o - 1, dims, &nd)) return 0;
    size_t n = 1;
    if (shape) shape->clear();
    for (int i = 0; i < nd; ++i) {
      n *= size_t(dims[i]);
      if (shape) shape->push_back(dims[i]);
    }
    return n * Elem();
  }
};

/* One request of a batch, once its input has been checked. */
struct Job {
  TRITONBACKEND_Request* request;
  TRITONBACKEND_Input* input;
  int batch, h, w;
  bool wants[5];
};

TRITONSERVER_Error* CheckRequest(const Instance& in, TRITONBACKEND_Request* r, Job* job) {
  const ModelState& m = *in.model;
  job->request = r;
  TRY(TRITONBACKEND_RequestInput(r, m.input.c_str(), &job->input));
  TRITONSERVER_DataType dt;
  const int64_t* shape;
  uint32_t nd, buffers;
  uint64_t bytes;
  TRY(TRITONBACKEND_InputProperties(job->input, nullptr, &dt, &shape, &nd, &bytes, &buffers));
  if (dt != m.dtype)
    return INVALID("input %s is %s, the model takes %s", m.input.c_str(), TRITONSERVER_DataTypeString(dt),
                   TRITONSERVER_DataTypeString(m.dtype));
  const int ci = m.layout == NVK_NHWC ? 3 : 1, hi = m.layout == NVK_NHWC ? 1 : 2;
  if (nd != 4 || shape[ci] != m.info.in_channels)
    return INVALID("input %s must be [batch, %s] with C = %d", m.input.c_str(),
                   m.layout == NVK_NHWC ? "H, W, C" : "C, H, W", m.info.in_channels);
  if (shape[0] < 1 || shape[0] > m.max_batch)
    return INVALID("batch %lld is outside 1 .. max_batch_size %d", (long long)shape[0], m.max_batch);
  if (shape[hi] < 1 || shape[hi + 1] < 1 || shape[hi] > 16384 || shape[hi + 1] > 16384)
    return INVALID("image size %lld x %lld", (long long)shape[hi], (long long)shape[hi + 1]);
  if (m.h > 0 && (shape[hi] != m.h || shape[hi + 1] != m.w))
    return INVALID("image size %lld x %lld, the model is configured for %lld x %lld", (long long)shape[hi],
                   (long long)shape[hi + 1], (long long)m.h, (long long)m.w);
  job->batch = int(shape[0]);
  job->h = int(shape[hi]);
  job->w = int(shape[hi + 1]);
  if (bytes != size_t(job->batch) * job->h * job->w * m.info.in_channels * in.Elem())
    return INVALID("input %s holds %llu bytes, its shape needs %zu", m.input.c_str(), (unsigned long long)bytes,
                   size_t(job->batch) * job->h * job->w * m.info.in_channels * in.Elem());
  if (m.h < 0 && !nvk_model_workspace_size(in.nvk, job->batch, job->h, job->w, 1))
    return INVALID("the model cannot run %d x %d images: %s", job->h, job->w, nvk_last_error());
  uint32_t n;
  TRY(TRITONBACKEND_RequestOutputCount(r, &n));
  std::fill(job->wants, job->wants + 5, false);
  for (uint32_t i = 0; i < n; ++i) {
    const char* name;
    TRY(TRITONBACKEND_RequestOutputName(r, i, &name));
    for (int o = 0; o < 5; ++o)
      if (!strcmp(name, kOutputs[o]) && m.output[o]) job->wants[o] = true;
  }
  return nullptr;
}

/* For calls whose failure leaves nothing to undo: the server log gets it. */
void Log(TRITONSERVER_Error* e) {
  if (!e) return;
  TRITONSERVER_LogMessage(TRITONSERVER_LOG_ERROR, __FILE__, __LINE__, TRITONSERVER_ErrorMessage(e));
  TRITONSERVER_ErrorDelete(e);
}

/* Sends `err` (taken) as the request's only response. */
void Respond(TRITONBACKEND_Request* r, TRITONSERVER_Error* err) {
  TRITONBACKEND_Response* resp;
  TRITONSERVER_Error* e = TRITONBACKEND_ResponseNew(&resp, r);
  Log(e ? e : TRITONBACKEND_ResponseSend(resp, TRITONSERVER_RESPONSE_COMPLETE_FINAL, err));
  if (err) TRITONSERVER_ErrorDelete(err);
}

/* Gathers the jobs' images into the instance's input, runs the outputs they ask for and copies
 * each job's rows into its response. Fills responses[] with the jobs' responses. */
TRITONSERVER_Error* Run(Instance& in, std::vector<Job>& jobs, std::vector<TRITONBACKEND_Response*>& responses) {
  const int h = jobs[0].h, w = jobs[0].w;
  int total = 0;
  bool any[5] = {false, false, false, false, false};
  for (const Job& j : jobs) {
    total += j.batch;
    for (int o = 0; o < 5; ++o) any[o] |= j.wants[o];
  }
  TRY(Cu(cu.push(in.ctx), "cuCtxPushCurrent"));
  struct Pop {
    ~Pop() {
      void* p;
      cu.pop(&p);
    }
  } pop;
  TRY(in.Reserve(total, h, w));
  size_t off = 0;
  for (const Job& j : jobs) {
    uint32_t buffers;
    TRY(TRITONBACKEND_InputProperties(j.input, nullptr, nullptr, nullptr, nullptr, nullptr, &buffers));
    for (uint32_t b = 0; b < buffers; ++b) {
      const void* src;
      uint64_t bytes;
      TRITONSERVER_MemoryType type = TRITONSERVER_MEMORY_CPU;
      int64_t type_id = 0;
      TRY(TRITONBACKEND_InputBuffer(j.input, b, &src, &bytes, &type, &type_id));
      if (off + bytes > in.input.size) return INVALID("the input buffers hold more bytes than the input shape");
      const CUdeviceptr dst = in.input.p + off;
      TRY(Cu(type == TRITONSERVER_MEMORY_GPU ? cu.dtod(dst, CUdeviceptr(uintptr_t(src)), bytes, in.stream)
                                             : cu.htod(dst, src, bytes, in.stream),
             "copying the input"));
      off += bytes;
    }
  }
  const void* x = in.input.at(0);
  if (any[0])
    TRY(Nvk(nvk_model_forward(in.nvk, x, in.model->layout, in.out[0].at(0), in.workspace.at(0), in.workspace.size,
                              total, h, w, in.stream)));
  if (any[1] || any[2] || any[3] || any[4]) {
    void* feats[4] = {in.out[1].at(0), in.out[2].at(0), in.out[3].at(0), in.out[4].at(0)};
    TRY(Nvk(nvk_model_forward_features(in.nvk, x, in.model->layout, feats, in.workspace.at(0), in.workspace.size,
                                       total, h, w, in.stream)));
  }
  /* Each output's shape and bytes for the whole batch, once; a request's are its rows of them. */
  std::vector<int64_t> shape[5];
  size_t host_bytes = 0, out_off[5] = {0, 0, 0, 0, 0}, out_bytes[5] = {0, 0, 0, 0, 0};
  for (int o = 0; o < 5; ++o)
    if (any[o]) {
      out_off[o] = host_bytes;
      out_bytes[o] = in.OutputBytes(o, total, h, w, &shape[o]);
      if (!out_bytes[o]) return Error(TRITONSERVER_ERROR_INTERNAL, "%s: %s", kOutputs[o], nvk_last_error());
      host_bytes += out_bytes[o];
    }
  in.host.resize(host_bytes);
  for (int o = 0; o < 5; ++o)
    if (any[o])
      TRY(Cu(cu.dtoh(in.host.data() + out_off[o], in.out[o].p, out_bytes[o], in.stream), "copying the outputs"));
  TRY(Cu(cu.stream_sync(in.stream), "cuStreamSynchronize"));
  int row = 0;
  for (size_t k = 0; k < jobs.size(); ++k) {
    const Job& j = jobs[k];
    TRY(TRITONBACKEND_ResponseNew(&responses[k], j.request));
    for (int o = 0; o < 5; ++o) {
      if (!j.wants[o]) continue;
      const size_t row_bytes = out_bytes[o] / size_t(total), bytes = row_bytes * size_t(j.batch);
      shape[o][0] = j.batch;
      const char* src = in.host.data() + out_off[o] + size_t(row) * row_bytes;
      const bool widen = o == 0 && in.model->logits_fp32;
      if (widen) {
        in.widened.resize(bytes / 2);
        for (size_t i = 0; i < in.widened.size(); ++i) {
          uint16_t hv;
          memcpy(&hv, src + 2 * i, 2);
          in.widened[i] = HalfToFloat(hv);
        }
        src = reinterpret_cast<const char*>(in.widened.data());
      }
      const size_t size = widen ? bytes * 2 : bytes;
      TRITONBACKEND_Output* output;
      TRY(TRITONBACKEND_ResponseOutput(responses[k], &output, kOutputs[o], widen ? TRITONSERVER_TYPE_FP32
                                       : in.model->dtype, shape[o].data(), uint32_t(shape[o].size())));
      void* dst;
      TRITONSERVER_MemoryType type = TRITONSERVER_MEMORY_CPU;
      int64_t type_id = 0;
      TRY(TRITONBACKEND_OutputBuffer(output, &dst, size, &type, &type_id));
      if (type == TRITONSERVER_MEMORY_GPU) {
        TRY(Cu(cu.htod(CUdeviceptr(uintptr_t(dst)), src, size, in.stream), "copying an output"));
        TRY(Cu(cu.stream_sync(in.stream), "cuStreamSynchronize"));  // src is reused by the next output
      } else {
        memcpy(dst, src, size);
      }
    }
    row += j.batch;
  }
  return Cu(cu.stream_sync(in.stream), "cuStreamSynchronize");
}

}  // namespace

/* ------------------------------------------------------------------ the entry points */
/* The header's TRITONBACKEND_ISPEC is empty with GCC: under -fvisibility=hidden the entry points
 * need their own attribute (and nothing else is exported). */
#define EXPORT __attribute__((visibility("default")))

extern "C" {

EXPORT TRITONSERVER_Error* TRITONBACKEND_Initialize(TRITONBACKEND_Backend*) {
  uint32_t major, minor;
  TRY(TRITONBACKEND_ApiVersion(&major, &minor));
  if (major != TRITONBACKEND_API_VERSION_MAJOR || minor < TRITONBACKEND_API_VERSION_MINOR)
    return Error(TRITONSERVER_ERROR_UNSUPPORTED, "nextvit backend: built for backend API %d.%d, the server has %u.%u",
                 TRITONBACKEND_API_VERSION_MAJOR, TRITONBACKEND_API_VERSION_MINOR, major, minor);
  return nullptr;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInitialize(TRITONBACKEND_Model* model) {
  auto s = std::make_unique<ModelState>();
  TRY(InitModel(model, s.get()));
  TRY(TRITONBACKEND_ModelSetState(model, s.get()));
  s.release();
  return nullptr;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelFinalize(TRITONBACKEND_Model* model) {
  void* s;
  TRY(TRITONBACKEND_ModelState(model, &s));
  delete static_cast<ModelState*>(s);
  return nullptr;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInstanceInitialize(TRITONBACKEND_ModelInstance* instance) {
  static std::once_flag once;
  std::call_once(once, OpenDriver);
  if (!driver_error.empty()) return Error(TRITONSERVER_ERROR_UNAVAILABLE, "%s", driver_error.c_str());
  TRITONBACKEND_Model* model;
  TRY(TRITONBACKEND_ModelInstanceModel(instance, &model));
  void* ms;
  TRY(TRITONBACKEND_ModelState(model, &ms));
  auto in = std::make_unique<Instance>();
  in->model = static_cast<ModelState*>(ms);
  TRITONSERVER_InstanceGroupKind kind;
  TRY(TRITONBACKEND_ModelInstanceKind(instance, &kind));
  if (kind == TRITONSERVER_INSTANCEGROUPKIND_GPU) {
    int32_t id;
    TRY(TRITONBACKEND_ModelInstanceDeviceId(instance, &id));
    in->device = id;
  } else if (kind == TRITONSERVER_INSTANCEGROUPKIND_MODEL) {
    in->device = in->model->device_param;
  } else {
    return INVALID("%s: Next-ViT runs on a GPU: instance_group kind KIND_GPU (or KIND_MODEL with "
                   "parameters.device)", in->model->name.c_str());
  }
  TRY(Cu(cu.device_get(&in->cudev, in->device), "cuDeviceGet"));
  TRY(Cu(cu.retain(&in->ctx, in->cudev), "cuDevicePrimaryCtxRetain"));
  TRY(Cu(cu.push(in->ctx), "cuCtxPushCurrent"));
  TRITONSERVER_Error* err = Cu(cu.stream_create(&in->stream, 1 /* non-blocking */), "cuStreamCreate");
  if (!err) err = Nvk(nvk_model_load(in->model->file.c_str(), in->device, &in->nvk));
  if (!err && in->model->h > 0)
    err = in->Reserve(in->model->max_batch, int(in->model->h), int(in->model->w));
  void* popped;
  cu.pop(&popped);
  TRY(err);
  TRY(TRITONBACKEND_ModelInstanceSetState(instance, in.get()));
  in.release();
  return nullptr;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInstanceFinalize(TRITONBACKEND_ModelInstance* instance) {
  void* s;
  TRY(TRITONBACKEND_ModelInstanceState(instance, &s));
  delete static_cast<Instance*>(s);
  return nullptr;
}

EXPORT TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(TRITONBACKEND_ModelInstance* instance,
                                                                          TRITONBACKEND_Request** requests,
                                                                          const uint32_t count) {
  void* s;
  TRY(TRITONBACKEND_ModelInstanceState(instance, &s));
  Instance& in = *static_cast<Instance*>(s);
  const uint64_t exec_start = Now();
  /* Checked requests, by image size: each size is one forward. */
  std::map<std::pair<int, int>, std::vector<Job>> groups;
  for (uint32_t i = 0; i < count; ++i) {
    Job job;
    if (TRITONSERVER_Error* err = CheckRequest(in, requests[i], &job)) {
      Respond(requests[i], err);
      const uint64_t t = Now();
      Log(TRITONBACKEND_ModelInstanceReportStatistics(instance, requests[i], false, exec_start, t, t, t));
      Log(TRITONBACKEND_RequestRelease(requests[i], TRITONSERVER_REQUEST_RELEASE_ALL));
      continue;
    }
    groups[{job.h, job.w}].push_back(job);
  }
  for (auto& g : groups) {
    std::vector<Job>& jobs = g.second;
    std::vector<TRITONBACKEND_Response*> responses(jobs.size(), nullptr);
    const uint64_t compute_start = Now();
    TRITONSERVER_Error* err = Run(in, jobs, responses);
    const uint64_t compute_end = Now();
    int total = 0;
    for (size_t k = 0; k < jobs.size(); ++k) {
      total += jobs[k].batch;
      if (err) {
        if (responses[k]) Log(TRITONBACKEND_ResponseDelete(responses[k]));
        Respond(jobs[k].request, TRITONSERVER_ErrorNew(TRITONSERVER_ErrorCode(err), TRITONSERVER_ErrorMessage(err)));
      } else {
        Log(TRITONBACKEND_ResponseSend(responses[k], TRITONSERVER_RESPONSE_COMPLETE_FINAL, nullptr));
      }
      Log(TRITONBACKEND_ModelInstanceReportStatistics(instance, jobs[k].request, err == nullptr, exec_start,
                                                      compute_start, compute_end, Now()));
      Log(TRITONBACKEND_RequestRelease(jobs[k].request, TRITONSERVER_REQUEST_RELEASE_ALL));
    }
    if (!err)
      Log(TRITONBACKEND_ModelInstanceReportBatchStatistics(instance, total, exec_start, compute_start, compute_end,
                                                           Now()));
    if (err) TRITONSERVER_ErrorDelete(err);
  }
  return nullptr;
}

}  // extern "C"
