/*
 * Numeric harness of the nextvit TensorRT plugin library (tests/test_trt_numerics.py drives it).
 *
 * A shared library that plays TensorRT for one plugin node at a time, with the plugin library
 * linked to the real C library. It is called through ctypes from the Python process that runs
 * nextvit_kernels.testing.cpu_driver(): that CPU stand-in of the CUDA driver executes every
 * launch of the C library with Triton's interpreter and needs the interpreter in the process,
 * hence a library and not an executable. Pointers handed to nvtrt_enqueue are host memory the
 * caller registered with the stand-in.
 *
 * The node goes through what TensorRT does with it, in TensorRT's order:
 *   build    createPlugin(kBUILD), getOutputDataTypes, getOutputShapes (B / H / W symbolic,
 *            evaluated at the run shape), supportsFormatCombination, configurePlugin (-1 B / H / W,
 *            the optimization profile's min = opt = the run shape, max given),
 *            getWorkspaceSize; then the engine's deserialization: getFieldsToSerialize ->
 *            createPlugin(kRUNTIME) -> attachToContext, whose plugin is the node's from then on
 *   enqueue  onShapeChange at the run shape, enqueue with the caller's pointers
 * Every plugin message and every failure of a step goes to the log (nvtrt_log).
 */
#include "NvInferRuntime.h"
#include "trt_test_host.h"

#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#define NVTRT_API extern "C" __attribute__((visibility("default")))

using namespace nvinfer1;
using namespace nvtrt_test;

namespace
{
constexpr int32_t kMAX_INPUTS{16};
constexpr int32_t kMAX_DIMS{Dims::MAX_DIMS}; //!< dims per input in nvtrt_build's arrays

TestLogger gLogger;
TestFinder gFinder(&gLogger);
std::string gLogText;

//! A harness-side failure: logged like a plugin's error, prefixed "harness:".
int fail(std::string const& what)
{
    gLogger.log(ILogger::Severity::kERROR, ("harness: " + what).c_str());
    return 1;
}

struct Node
{
    std::unique_ptr<IPluginV3> plugin; //!< the attached runtime plugin
    std::vector<PluginTensorDesc> in;
    PluginTensorDesc out{};
};

bool toDataType(int nvkDtype, DataType& type)
{
    switch (nvkDtype)
    {
    case 0: type = DataType::kFLOAT; return true; // nvk_dtype NVK_F32
    case 1: type = DataType::kHALF; return true;  // NVK_F16
    case 2: type = DataType::kBF16; return true;  // NVK_BF16
    default: return false;
    }
}

std::vector<Dims> readDims(int32_t n, int32_t const* ranks, int64_t const* dims)
{
    std::vector<Dims> out(n);
    for (int32_t i = 0; i < n; ++i)
    {
        out[i].nbDims = ranks[i];
        for (int32_t k = 0; k < ranks[i]; ++k)
        {
            out[i].d[k] = dims[i * kMAX_DIMS + k];
        }
    }
    return out;
}

//! Everything of nvtrt_build after the arguments were checked.
int build(Library const& lib, char const* name, FieldSet& fields, std::vector<Dims> const& run,
    std::vector<Dims> const& max, int32_t nbActivations, DataType type, Dims& outDims, size_t& workspace,
    std::unique_ptr<Node>& node)
{
    auto const cs = creators(lib);
    auto const it = cs.find(name);
    if (it == cs.end())
    {
        return fail(std::string("the library has no creator ") + name);
    }
    IPluginCreatorV3One* creator = it->second;
    std::unique_ptr<IPluginV3> p(creator->createPlugin("layer", fields.fc(), TensorRTPhase::kBUILD));
    if (p == nullptr)
    {
        return fail("createPlugin(kBUILD) failed");
    }
    Caps const cp = caps(p.get());
    if (cp.core == nullptr || cp.build == nullptr || cp.runtime == nullptr)
    {
        return fail("a capability interface is missing");
    }
    int32_t const nIn = static_cast<int32_t>(run.size());
    if (cp.build->getNbOutputs() != 1)
    {
        return fail("getNbOutputs is not 1");
    }
    std::vector<DataType> const types(nIn, type);
    DataType outType{};
    if (cp.build->getOutputDataTypes(&outType, 1, types.data(), nIn) != 0 || outType != type)
    {
        return fail("getOutputDataTypes did not keep the input type");
    }
    OutputShape const shape = outputShape(*cp.build, run, max, nbActivations, true);
    if (shape.status != 0 || shape.nullDim >= 0)
    {
        return fail("getOutputShapes failed or left a dim null");
    }
    std::vector<DynamicPluginTensorDesc> const dyn = dynamicInputs(run, max, nbActivations, type);
    DynamicPluginTensorDesc const dynOut = dynamicOutput(shape, type);
    std::vector<DynamicPluginTensorDesc> io = dyn;
    io.push_back(dynOut);
    for (int32_t pos = 0; pos <= nIn; ++pos)
    {
        if (!cp.build->supportsFormatCombination(pos, io.data(), nIn, 1))
        {
            return fail("supportsFormatCombination rejects kLINEAR at position " + std::to_string(pos));
        }
    }
    if (cp.build->configurePlugin(dyn.data(), nIn, &dynOut, 1) != 0)
    {
        return fail("configurePlugin rejected the profile");
    }
    workspace = cp.build->getWorkspaceSize(dyn.data(), nIn, &dynOut, 1);

    // the engine: serialized fields -> runtime plugin -> attached to an execution context
    PluginFieldCollection const* serialized = cp.runtime->getFieldsToSerialize();
    std::unique_ptr<IPluginV3> q(
        serialized != nullptr ? creator->createPlugin("layer", serialized, TensorRTPhase::kRUNTIME) : nullptr);
    if (q == nullptr)
    {
        return fail("createPlugin(kRUNTIME) rejected the serialized fields");
    }
    TestResourceContext context;
    Caps const cq = caps(q.get());
    std::unique_ptr<IPluginV3> attached(cq.runtime != nullptr ? cq.runtime->attachToContext(&context) : nullptr);
    if (attached == nullptr || caps(attached.get()).runtime == nullptr)
    {
        return fail("attachToContext returned no runtime plugin");
    }
    node = std::make_unique<Node>();
    node->plugin = std::move(attached);
    for (Dims const& d : run)
    {
        node->in.push_back(PluginTensorDesc{d, type, TensorFormat::kLINEAR, 1.F});
    }
    outDims = shape.atRun;
    node->out = PluginTensorDesc{outDims, type, TensorFormat::kLINEAR, 1.F};
    return 0;
}
} // namespace

/* Opens the plugin library at `path` as IPluginRegistry::loadLibrary does (dlopen, setLoggerFinder
 * with this harness's logger, getCreators). Returns a handle for nvtrt_build / nvtrt_symbol, or
 * NULL (the log says why). The library stays loaded, as in TensorRT's registry. */
NVTRT_API void* nvtrt_open(char const* path)
{
    try
    {
        gLogger.entries.clear();
        auto lib = std::make_unique<Library>();
        std::string error;
        if (!openLibrary(path, *lib, error))
        {
            fail(error);
            return nullptr;
        }
        lib->setLoggerFinder(&gFinder);
        if (creators(*lib).empty())
        {
            fail(std::string(path) + " hands out no V3One creators");
            return nullptr;
        }
        return lib.release();
    }
    catch (...)
    {
        return nullptr;
    }
}

/* The address `symbol` has for the plugin library (itself, then what it links: its C library's
 * nvk_* entry points), NULL if none: lets the caller check which C library the plugins call. */
NVTRT_API void* nvtrt_symbol(void* lib, char const* symbol)
{
    if (lib == nullptr || symbol == nullptr)
    {
        return nullptr;
    }
    return dlsym(static_cast<Library*>(lib)->handle, symbol);
}

/* Builds plugin `name` with int32 fields (field_names[i] = field_values[i]) for nb_inputs inputs of
 * ranks[i] dims each, dims[i * 8 + k] at the run shape, max_dims likewise at the optimization
 * profile's upper bound (NULL: the run shape); the first nb_activations inputs are the
 * activations, whose B / H / W are dynamic. `dtype` is an nvk_dtype (0 fp32, 1 fp16, 2 bf16).
 * Returns 0 with *node, the output's rank / dims (out_dims: 8 entries) and the workspace size
 * set, or non-zero (the log says which step failed). The log is cleared first. */
NVTRT_API int nvtrt_build(void* lib, char const* name, int nb_fields, char const* const* field_names,
    int32_t const* field_values, int nb_inputs, int nb_activations, int32_t const* ranks, int64_t const* dims,
    int64_t const* max_dims, int dtype, int32_t* out_rank, int64_t* out_dims, uint64_t* workspace_size, void** node)
{
    try
    {
        gLogger.entries.clear();
        if (node != nullptr)
        {
            *node = nullptr;
        }
        DataType type{};
        if (lib == nullptr || name == nullptr || ranks == nullptr || dims == nullptr || out_rank == nullptr
            || out_dims == nullptr || workspace_size == nullptr || node == nullptr
            || (nb_fields > 0 && (field_names == nullptr || field_values == nullptr)))
        {
            return fail("nvtrt_build: a required pointer argument is NULL");
        }
        if (nb_fields < 0 || nb_inputs < 1 || nb_inputs > kMAX_INPUTS || nb_activations < 1 || nb_activations > nb_inputs)
        {
            return fail("nvtrt_build: bad counts (" + std::to_string(nb_fields) + " fields, " + std::to_string(nb_inputs)
                + " inputs, " + std::to_string(nb_activations) + " activations)");
        }
        if (!toDataType(dtype, type))
        {
            return fail("nvtrt_build: dtype " + std::to_string(dtype) + " is not an nvk_dtype");
        }
        for (int32_t i = 0; i < nb_inputs; ++i)
        {
            if (ranks[i] < 1 || ranks[i] > kMAX_DIMS || (i < nb_activations && ranks[i] != 4))
            {
                return fail("nvtrt_build: input " + std::to_string(i) + " has rank " + std::to_string(ranks[i])
                    + " (activations are NHWC, at most " + std::to_string(kMAX_DIMS) + " dims)");
            }
        }
        std::vector<Dims> const run = readDims(nb_inputs, ranks, dims);
        std::vector<Dims> const max = max_dims != nullptr ? readDims(nb_inputs, ranks, max_dims) : run;
        for (int32_t i = 0; i < nb_inputs; ++i)
        {
            for (int32_t k = 0; k < ranks[i]; ++k)
            {
                if (run[i].d[k] < 1 || max[i].d[k] < run[i].d[k])
                {
                    return fail("nvtrt_build: input " + std::to_string(i) + " has dims " + str(run[i]) + ", profile max "
                        + str(max[i]));
                }
            }
        }
        FieldSet fields;
        for (int32_t i = 0; i < nb_fields; ++i)
        {
            if (field_names[i] == nullptr)
            {
                return fail("nvtrt_build: field " + std::to_string(i) + " has no name");
            }
            fields.i32(field_names[i], field_values[i]);
        }
        Dims outDims{};
        size_t workspace = 0;
        std::unique_ptr<Node> built;
        int const status = build(*static_cast<Library*>(lib), name, fields, run, max, nb_activations, type, outDims,
            workspace, built);
        if (status != 0)
        {
            return status;
        }
        *out_rank = outDims.nbDims;
        for (int32_t k = 0; k < kMAX_DIMS; ++k)
        {
            out_dims[k] = k < outDims.nbDims ? outDims.d[k] : 0;
        }
        *workspace_size = workspace;
        *node = built.release();
        return 0;
    }
    catch (...)
    {
        return fail("nvtrt_build: exception");
    }
}

/* onShapeChange and enqueue of a built node: inputs in the node's input order, one output, the
 * workspace (NULL when none), the stream (NULL: the default stream). Returns enqueue's status,
 * or non-zero when onShapeChange rejected the shapes (logged). The log is cleared first. */
NVTRT_API int nvtrt_enqueue(void* node, void const* const* inputs, void* output, void* workspace, void* stream)
{
    gLogger.entries.clear();
    if (node == nullptr || inputs == nullptr || output == nullptr)
    {
        return fail("nvtrt_enqueue: node, inputs and output must not be NULL");
    }
    Node& n = *static_cast<Node*>(node);
    IPluginV3OneRuntime* rt = caps(n.plugin.get()).runtime;
    int32_t const nIn = static_cast<int32_t>(n.in.size());
    if (rt->onShapeChange(n.in.data(), nIn, &n.out, 1) != 0)
    {
        return fail("onShapeChange rejected the run shape");
    }
    void* outputs[] = {output};
    return rt->enqueue(n.in.data(), &n.out, inputs, outputs, workspace, static_cast<cudaStream_t>(stream));
}

NVTRT_API void nvtrt_free(void* node)
{
    delete static_cast<Node*>(node);
}

/* What was logged since the last nvtrt_open / nvtrt_build / nvtrt_enqueue began: one line per
 * message, "E: " for errors, "W: " for warnings, "I: " for the rest; "" when nothing. */
NVTRT_API char const* nvtrt_log(void)
{
    try
    {
        gLogText.clear();
        for (auto const& e : gLogger.entries)
        {
            char const* tag = e.severity <= ILogger::Severity::kERROR ? "E: "
                : e.severity == ILogger::Severity::kWARNING          ? "W: "
                                                                     : "I: ";
            gLogText += tag + e.msg + "\n";
        }
    }
    catch (...)
    {
        gLogText.clear();
    }
    return gLogText.c_str();
}
