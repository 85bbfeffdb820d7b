/*
 * CPU contract test of the nextvit TensorRT plugin library (tests/test_trt_contract.py runs it).
 *
 * It plays the host: it loads the library as IPluginRegistry::loadLibrary does (dlopen,
 * setLoggerFinder with a recording logger, getCreators), with a stand-in libnvinfer.so.<major>
 * (fake_nvinfer.cpp: getInferLibVersion, getPluginRegistry) loaded as a host loads TensorRT,
 * and drives every creator and plugin through the
 * IPluginV3One* methods TensorRT calls while building and running an engine. The plugins are
 * linked to a recording stub of the C library (nvk_stub.h), so the test checks what reaches it.
 * The expected shapes and C library arguments below are written out by hand from the plugins'
 * contract (csrc/trt/README.md, csrc/include/nextvit_kernels.h), not derived from the sources.
 *
 *   nextvit_trt_contract describe <lib>   JSON of the creators (names, versions, fields) on stdout
 *   nextvit_trt_contract check <lib>      all checks; "ok <group>" / "FAIL <group>: ..." lines
 * How the library meets the host's plugin registry, each in its own process:
 *   nextvit_trt_contract dlopen <lib>       a host that only dlopens it, libnvinfer loaded RTLD_LOCAL
 *                                           first (Triton's TensorRT backend): registered at load
 *                                           under "nextvit", deregistered at unload
 *   nextvit_trt_contract loadlibrary <lib>  IPluginRegistry::loadLibrary's calls after that: each
 *                                           creator registered once, no refused registry call
 *   nextvit_trt_contract no-nvinfer <lib>   no libnvinfer: nothing registered, getCreators works
 * Exit status 0 when every check passed.
 */
#include "NvInferRuntime.h"
#include "NvInferVersion.h"
#include "nvk_stub.h"
#include "trt_test_host.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

using namespace nvinfer1;
using namespace nvtrt_test;

#define NVTRT_STR2(x) #x
#define NVTRT_STR(x) NVTRT_STR2(x)
#ifndef NVTRT_FAKE_NVINFER
#error "NVTRT_FAKE_NVINFER: the path of the stand-in libnvinfer (CMakeLists.txt defines it)"
#endif

// ------------------------------------------------------------------ heap allocation counting
// The harness's malloc family counts calls while gCountAllocs is set (operator new goes
// through malloc). Not under AddressSanitizer, which replaces them itself.
#if defined(__SANITIZE_ADDRESS__)
#define NVTRT_COUNT_ALLOCS 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define NVTRT_COUNT_ALLOCS 0
#endif
#endif
#ifndef NVTRT_COUNT_ALLOCS
#define NVTRT_COUNT_ALLOCS 1
#endif

namespace
{
bool gCountAllocs = false;
long gNbAllocs = 0;
} // namespace

#if NVTRT_COUNT_ALLOCS
extern "C" void* __libc_malloc(size_t);
extern "C" void* __libc_calloc(size_t, size_t);
extern "C" void* __libc_realloc(void*, size_t);
extern "C" void* malloc(size_t n) noexcept
{
    gNbAllocs += gCountAllocs ? 1 : 0;
    return __libc_malloc(n);
}
extern "C" void* calloc(size_t n, size_t size) noexcept
{
    gNbAllocs += gCountAllocs ? 1 : 0;
    return __libc_calloc(n, size);
}
extern "C" void* realloc(void* p, size_t n) noexcept
{
    gNbAllocs += gCountAllocs ? 1 : 0;
    return __libc_realloc(p, n);
}
#endif

// ------------------------------------------------------------------ the host's libnvinfer
namespace
{
//! The stand-in libnvinfer.so.<major> (fake_nvinfer.cpp; NVTRT_FAKE_NVINFER is its path), loaded
//! as a host loads TensorRT.
struct Nvinfer
{
    void* handle{nullptr};
    IPluginRegistry* registry{nullptr};
    void (*setVersion)(int32_t){nullptr};
    int32_t (*failures)(){nullptr};
};

char const kNVINFER_SONAME[] = "libnvinfer.so." NVTRT_STR(NV_TENSORRT_MAJOR);

//! dlopen with `scope` (RTLD_GLOBAL: a host linked to libnvinfer, as trtexec; RTLD_LOCAL: a
//! dependency of a library the host dlopened, as Triton's TensorRT backend); exits when it
//! cannot be loaded.
Nvinfer loadNvinfer(int scope)
{
    Nvinfer nv;
    nv.handle = dlopen(NVTRT_FAKE_NVINFER, RTLD_NOW | scope);
    if (nv.handle != nullptr)
    {
        using GetRegistry = IPluginRegistry* (*) ();
        auto const get = reinterpret_cast<GetRegistry>(dlsym(nv.handle, "getPluginRegistry"));
        nv.registry = get != nullptr ? get() : nullptr;
        nv.setVersion = reinterpret_cast<void (*)(int32_t)>(dlsym(nv.handle, "nvtrt_fake_set_version"));
        nv.failures = reinterpret_cast<int32_t (*)()>(dlsym(nv.handle, "nvtrt_fake_registry_failures"));
    }
    if (nv.registry == nullptr || nv.setVersion == nullptr || nv.failures == nullptr)
    {
        char const* why = dlerror();
        std::fprintf(stderr, "cannot use the stand-in libnvinfer %s: %s\n", NVTRT_FAKE_NVINFER, why != nullptr ? why : "?");
        std::exit(2);
    }
    return nv;
}

//! Every creator `registry` holds, in its order.
std::vector<IPluginCreatorInterface*> registeredCreators(IPluginRegistry& registry)
{
    int32_t n = -1;
    IPluginCreatorInterface* const* list = registry.getAllCreators(&n);
    return list != nullptr && n > 0 ? std::vector<IPluginCreatorInterface*>(list, list + n)
                                    : std::vector<IPluginCreatorInterface*>{};
}
} // namespace

namespace
{
TestLogger gLogger;
TestFinder gFinder(&gLogger);

// ------------------------------------------------------------------ checks
std::string gGroup;
int gFailures = 0;

void check(bool ok, std::string const& what)
{
    if (!ok)
    {
        std::printf("FAIL %s: %s\n", gGroup.c_str(), what.c_str());
        ++gFailures;
    }
}

//! A named group of checks: prints "ok <name>" at its end when none of its checks failed.
class Group
{
public:
    explicit Group(std::string name)
        : mFailuresBefore(gFailures)
    {
        gGroup = std::move(name);
        gLogger.entries.clear();
    }
    ~Group()
    {
        if (gFailures == mFailuresBefore)
        {
            std::printf("ok %s\n", gGroup.c_str());
        }
        std::fflush(stdout);
    }

private:
    int mFailuresBefore;
};

// ------------------------------------------------------------------ the plugin library
//! The library at `path`, opened as IPluginRegistry::loadLibrary does; exits when it cannot be.
Library openOrExit(char const* path)
{
    Library lib;
    std::string error;
    if (!openLibrary(path, lib, error))
    {
        std::fprintf(stderr, "%s\n", error.c_str());
        std::exit(2);
    }
    return lib;
}

//! The creator of `name`, or nullptr with a failed check.
IPluginCreatorV3One* creatorOf(Library const& lib, std::string const& name)
{
    auto const cs = creators(lib);
    auto const it = cs.find(name);
    check(it != cs.end(), "no creator " + name);
    return it != cs.end() ? it->second : nullptr;
}

char const* fieldTypeName(PluginFieldType t)
{
    switch (t)
    {
    case PluginFieldType::kINT8: return "kINT8";
    case PluginFieldType::kINT16: return "kINT16";
    case PluginFieldType::kINT32: return "kINT32";
    case PluginFieldType::kINT64: return "kINT64";
    case PluginFieldType::kFLOAT16: return "kFLOAT16";
    case PluginFieldType::kFLOAT32: return "kFLOAT32";
    case PluginFieldType::kFLOAT64: return "kFLOAT64";
    case PluginFieldType::kCHAR: return "kCHAR";
    default: return "other";
    }
}

// ------------------------------------------------------------------ the contract, by hand
enum : int
{
    kNULL_PTR = -1, //!< the C call gets NULL here
    kOUT_PTR = -2   //!< the C call gets the output here
};

struct Case
{
    std::string plugin;
    std::vector<std::pair<std::string, int32_t>> fields;
    std::vector<Dims> in;
    int32_t nbActivations; //!< the leading inputs that are activations (dynamic B, H, W)
    Dims out;
    std::string fn;          //!< the C library function enqueue calls
    std::vector<int> ptrs;   //!< its pointer arguments: input index, kNULL_PTR or kOUT_PTR
    std::vector<long long> ints; //!< its int arguments (B, H, W, channels, fields)
    bool workspace;          //!< it takes a workspace sized by <fn>_workspace_size (same int arguments)
    int32_t badInput, badDim; //!< a weight dimension whose change must be rejected
};

struct Range
{
    int32_t min, max;
};
//! The accepted range of every plugin field (csrc/trt/README.md).
std::map<std::string, Range> const kRANGES{{"stride", {1, 2}}, {"residual", {0, 1}}, {"has_x2", {0, 1}},
    {"sr_ratio", {1, std::numeric_limits<int32_t>::max()}}, {"head_dim", {1, std::numeric_limits<int32_t>::max()}}};

std::vector<Case> cases()
{
    Dims const c64{mkDims({64, 64})}, b64{mkDims({64})};
    Dims const c48{mkDims({48, 48})}, b48{mkDims({48})};
    return {
        {"NextViTConvBnRelu", {{"stride", 2}}, {mkDims({2, 7, 9, 3}), mkDims({16, 3, 3, 3}), mkDims({16})}, 1,
            mkDims({2, 4, 5, 16}), "nvk_conv_bn_relu", {0, 1, 2, kOUT_PTR}, {2, 7, 9, 3, 16, 2}, false, 1, 1},
        {"NextViTConvBnRelu", {{"stride", 1}}, {mkDims({1, 5, 6, 16}), mkDims({8, 16, 3, 3}), mkDims({8})}, 1,
            mkDims({1, 5, 6, 8}), "nvk_conv_bn_relu", {0, 1, 2, kOUT_PTR}, {1, 5, 6, 16, 8, 1}, false, 2, 0},
        {"NextViTPatchEmbed", {{"stride", 2}}, {mkDims({3, 7, 5, 64}), mkDims({96, 64}), mkDims({96})}, 1,
            mkDims({3, 4, 3, 96}), "nvk_patch_embed", {0, 1, 2, kOUT_PTR}, {3, 7, 5, 64, 96, 2}, false, 1, 1},
        {"NextViTPatchEmbed", {{"stride", 1}}, {mkDims({2, 14, 14, 96}), mkDims({128, 96}), mkDims({128})}, 1,
            mkDims({2, 14, 14, 128}), "nvk_patch_embed", {0, 1, 2, kOUT_PTR}, {2, 14, 14, 96, 128, 1}, false, 2, 0},
        {"NextViTMHCA", {{"residual", 1}},
            {mkDims({2, 7, 7, 64}), mkDims({64, 32, 3, 3}), mkDims({64}), mkDims({64, 64})}, 1, mkDims({2, 7, 7, 64}),
            "nvk_mhca", {0, 1, 2, 3, kOUT_PTR}, {2, 7, 7, 64, 64, 1}, true, 1, 1},
        {"NextViTMHCA", {{"residual", 0}},
            {mkDims({1, 5, 9, 96}), mkDims({96, 32, 3, 3}), mkDims({96}), mkDims({128, 96})}, 1, mkDims({1, 5, 9, 128}),
            "nvk_mhca", {0, 1, 2, 3, kOUT_PTR}, {1, 5, 9, 96, 128, 0}, true, 3, 1},
        {"NextViTMLP", {{"residual", 1}, {"has_x2", 0}},
            {mkDims({2, 5, 7, 64}), mkDims({128, 64}), mkDims({128}), mkDims({64, 128}), b64}, 1, mkDims({2, 5, 7, 64}),
            "nvk_mlp", {0, kNULL_PTR, 1, 2, 3, 4, kOUT_PTR}, {2, 5, 7, 64, 0, 128, 64, 1}, true, 1, 1},
        {"NextViTMLP", {{"residual", 0}, {"has_x2", 1}},
            {mkDims({2, 5, 7, 64}), mkDims({2, 5, 7, 32}), mkDims({192, 96}), mkDims({192}), mkDims({288, 192}),
                mkDims({288})},
            2, mkDims({2, 5, 7, 288}), "nvk_mlp", {0, 1, 2, 3, 4, 5, kOUT_PTR}, {2, 5, 7, 64, 32, 192, 288, 0}, true,
            4, 1},
        {"NextViTEMHSA", {{"sr_ratio", 2}, {"head_dim", 32}, {"residual", 1}},
            {mkDims({2, 7, 9, 64}), c64, b64, c64, b64, c64, b64, c64, b64}, 1, mkDims({2, 7, 9, 64}), "nvk_e_mhsa",
            {0, 1, 2, 3, 4, 5, 6, 7, 8, kOUT_PTR}, {2, 7, 9, 64, 64, 2, 32, 1}, true, 3, 0},
        {"NextViTEMHSA", {{"sr_ratio", 1}, {"head_dim", 16}, {"residual", 0}},
            {mkDims({1, 3, 5, 48}), c48, b48, c48, b48, c48, b48, mkDims({80, 48}), mkDims({80})}, 1,
            mkDims({1, 3, 5, 80}), "nvk_e_mhsa", {0, 1, 2, 3, 4, 5, 6, 7, 8, kOUT_PTR}, {1, 3, 5, 48, 80, 1, 16, 0},
            true, 8, 0},
        {"NextViTHead", {}, {mkDims({2, 7, 7, 64}), mkDims({10, 64}), mkDims({10})}, 1, mkDims({2, 10}), "nvk_head",
            {0, 1, 2, kOUT_PTR}, {2, 7, 7, 64, 10}, false, 1, 1},
    };
}

FieldSet caseFields(Case const& c)
{
    FieldSet fs;
    for (auto const& f : c.fields)
    {
        fs.i32(f.first.c_str(), f.second);
    }
    return fs;
}

bool supportedType(DataType t)
{
    return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

int nvkType(DataType t)
{
    return t == DataType::kFLOAT ? NVK_F32 : t == DataType::kHALF ? NVK_F16 : NVK_BF16;
}

//! The case's input dims at the profile's max: the activations' B, H, W grown.
std::vector<Dims> profileMax(Case const& c)
{
    std::vector<Dims> max = c.in;
    for (int32_t i = 0; i < c.nbActivations; ++i)
    {
        max[i].d[0] *= 3;
        max[i].d[1] += 3;
        max[i].d[2] += 5;
    }
    return max;
}

// ------------------------------------------------------------------ the checks
//! enqueue with fake device pointers; checks the one C library call it makes.
void checkEnqueue(IPluginV3* p, Case const& c, DataType dt, std::string const& label)
{
    size_t const nIn = c.in.size();
    std::vector<PluginTensorDesc> in(nIn);
    std::vector<void const*> ptrs(nIn);
    for (size_t i = 0; i < nIn; ++i)
    {
        in[i] = PluginTensorDesc{c.in[i], dt, TensorFormat::kLINEAR, 1.F};
        ptrs[i] = reinterpret_cast<void const*>(static_cast<uintptr_t>(0x10000 * (i + 1)));
    }
    PluginTensorDesc out{c.out, dt, TensorFormat::kLINEAR, 1.F};
    void* outPtr = reinterpret_cast<void*>(static_cast<uintptr_t>(0xF00000));
    void* outs[] = {outPtr};
    void* workspace = reinterpret_cast<void*>(static_cast<uintptr_t>(0xE00000));
    auto stream = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(0x5EED00));
    IPluginV3OneRuntime* rt = caps(p).runtime;
    check(rt->onShapeChange(in.data(), static_cast<int32_t>(nIn), &out, 1) == 0, label + ": onShapeChange rejected the shapes" + gLogger.dump());

    nvk_stub_reset();
    gNbAllocs = 0;
    gCountAllocs = true;
    int32_t const status = rt->enqueue(in.data(), &out, ptrs.data(), outs, workspace, stream);
    gCountAllocs = false;
    check(status == 0, label + ": enqueue returned " + std::to_string(status) + gLogger.dump());
    check(gNbAllocs == 0, label + ": enqueue allocated heap memory " + std::to_string(gNbAllocs) + " times");
    nvk_stub_call const* call = nvk_stub_last_call();
    check(nvk_stub_nb_calls() == 1 && call != nullptr, label + ": expected one C library call, got " + std::to_string(nvk_stub_nb_calls()));
    if (call == nullptr)
    {
        return;
    }
    check(c.fn == call->fn, label + ": called " + call->fn + " instead of " + c.fn);
    bool ptrsOk = call->nb_ptrs == static_cast<int>(c.ptrs.size());
    for (size_t i = 0; ptrsOk && i < c.ptrs.size(); ++i)
    {
        void const* expected = c.ptrs[i] == kNULL_PTR ? nullptr : c.ptrs[i] == kOUT_PTR ? outPtr : ptrs[c.ptrs[i]];
        ptrsOk = call->ptrs[i] == expected;
    }
    check(ptrsOk, label + ": tensor pointers passed in the wrong order");
    std::vector<long long> const ints(call->ints, call->ints + call->nb_ints);
    std::string got, want;
    for (long long v : ints)
    {
        got += std::to_string(v) + " ";
    }
    for (long long v : c.ints)
    {
        want += std::to_string(v) + " ";
    }
    check(ints == c.ints, label + ": int arguments " + got + "instead of " + want);
    check(call->dtype == nvkType(dt), label + ": dtype " + std::to_string(call->dtype));
    check(call->stream == static_cast<void*>(stream), label + ": not TensorRT's stream");
    check(!c.workspace || call->workspace == workspace, label + ": not TensorRT's workspace");
}

void checkCase(Library const& lib, Case const& c, int index)
{
    std::string const name = c.plugin + "[" + std::to_string(index) + "]";
    IPluginCreatorV3One* creator = creatorOf(lib, c.plugin);
    if (creator == nullptr)
    {
        return;
    }
    int32_t const nIn = static_cast<int32_t>(c.in.size());
    FieldSet fs = caseFields(c);
    IPluginV3* p = creator->createPlugin("layer", fs.fc(), TensorRTPhase::kBUILD);
    {
        Group g(name + " createPlugin");
        check(p != nullptr, "createPlugin(kBUILD) failed" + gLogger.dump());
    }
    if (p == nullptr)
    {
        return;
    }
    Caps const cp = caps(p);
    {
        Group g(name + " capabilities, name, version, namespace, getNbOutputs");
        check(cp.core != nullptr && cp.build != nullptr && cp.runtime != nullptr, "missing capability interface");
        check(c.plugin == cp.core->getPluginName(), "getPluginName");
        check(std::string(cp.core->getPluginVersion()) == creator->getPluginVersion(), "version differs from the creator's");
        check(std::string(cp.core->getPluginNamespace()) == creator->getPluginNamespace(), "namespace differs from the creator's");
        check(cp.build->getNbOutputs() == 1, "getNbOutputs");
    }
    {
        Group g(name + " getOutputDataTypes");
        std::vector<DataType> types(nIn);
        for (int32_t t = 0; t < EnumMax<DataType>(); ++t)
        {
            auto const dt = static_cast<DataType>(t);
            std::fill(types.begin(), types.end(), dt);
            DataType outType = DataType::kINT32;
            gLogger.entries.clear();
            int32_t const r = cp.build->getOutputDataTypes(&outType, 1, types.data(), nIn);
            if (supportedType(dt))
            {
                check(r == 0 && outType == dt, "type " + std::to_string(t) + " not kept");
            }
            else
            {
                check(r != 0 && gLogger.hasError(), "type " + std::to_string(t) + " accepted or not logged");
            }
        }
    }
    {
        Group g(name + " getOutputShapes");
        for (bool symbolic : {false, true})
        {
            OutputShape const out = outputShape(*cp.build, c.in, c.in, c.nbActivations, symbolic);
            std::string const what = symbolic ? "symbolic B/H/W: " : "constant dims: ";
            check(out.status == 0, what + "getOutputShapes failed");
            check(out.atRun.nbDims == c.out.nbDims, what + "rank " + std::to_string(out.atRun.nbDims));
            check(out.nullDim < 0, what + "null dim " + std::to_string(out.nullDim));
            for (int32_t k = 0; out.status == 0 && k < out.atRun.nbDims && k < c.out.nbDims; ++k)
            {
                check(out.atRun.d[k] == c.out.d[k], what + "dim " + std::to_string(k) + " = " + std::to_string(out.atRun.d[k])
                    + ", expected " + std::to_string(c.out.d[k]));
                check(symbolic || out.constant[k], what + "dim " + std::to_string(k) + " not constant");
            }
            check(!symbolic || (out.status == 0 && !out.constant[0]), what + "the batch dim lost its symbol");
        }
    }
    {
        Group g(name + " supportsFormatCombination");
        std::vector<DynamicPluginTensorDesc> io(nIn + 1);
        for (int32_t t = 0; t < EnumMax<DataType>(); ++t)
        {
            for (int32_t f = 0; f < EnumMax<TensorFormat>(); ++f)
            {
                for (auto& d : io)
                {
                    d.desc.type = static_cast<DataType>(t);
                    d.desc.format = TensorFormat::kLINEAR;
                }
                io[0].desc.format = static_cast<TensorFormat>(f);
                bool const expected = f == static_cast<int32_t>(TensorFormat::kLINEAR) && supportedType(static_cast<DataType>(t));
                check(cp.build->supportsFormatCombination(0, io.data(), nIn, 1) == expected,
                    "pos 0 type " + std::to_string(t) + " format " + std::to_string(f));
            }
        }
        for (int32_t pos = 1; pos <= nIn; ++pos)
        {
            for (auto& d : io)
            {
                d.desc.type = DataType::kHALF;
                d.desc.format = TensorFormat::kLINEAR;
            }
            check(cp.build->supportsFormatCombination(pos, io.data(), nIn, 1), "pos " + std::to_string(pos) + ": same type rejected");
            io[pos].desc.type = DataType::kFLOAT;
            check(!cp.build->supportsFormatCombination(pos, io.data(), nIn, 1), "pos " + std::to_string(pos) + ": mixed types accepted");
            io[pos].desc.type = DataType::kHALF;
            io[pos].desc.format = TensorFormat::kHWC8;
            check(!cp.build->supportsFormatCombination(pos, io.data(), nIn, 1), "pos " + std::to_string(pos) + ": kHWC8 accepted");
        }
    }
    std::vector<Dims> const max = profileMax(c);
    std::vector<DynamicPluginTensorDesc> const dyn = dynamicInputs(c.in, max, c.nbActivations, DataType::kHALF);
    DynamicPluginTensorDesc const dynOut
        = dynamicOutput(outputShape(*cp.build, c.in, max, c.nbActivations, true), DataType::kHALF);
    {
        Group g(name + " configurePlugin");
        check(cp.build->configurePlugin(dyn.data(), nIn, &dynOut, 1) == 0, "-1 B/H/W rejected" + gLogger.dump());
        check(!gLogger.hasError(), "-1 B/H/W logged an error" + gLogger.dump());
        std::vector<DynamicPluginTensorDesc> bad = dyn;
        bad[c.badInput].desc.dims.d[c.badDim] += 1;
        check(cp.build->configurePlugin(bad.data(), nIn, &dynOut, 1) != 0,
            "wrong weight shape " + str(bad[c.badInput].desc.dims) + " of input " + std::to_string(c.badInput) + " accepted");
        check(gLogger.has(ILogger::Severity::kERROR, c.plugin), "wrong weight shape not logged with the plugin name" + gLogger.dump());
        gLogger.entries.clear();
        check(cp.build->configurePlugin(dyn.data(), nIn - 1, &dynOut, 1) != 0 && gLogger.hasError(), "one input too few accepted or not logged");
    }
    {
        Group g(name + " getWorkspaceSize");
        nvk_stub_reset();
        size_t const size = cp.build->getWorkspaceSize(dyn.data(), nIn, &dynOut, 1);
        if (c.workspace)
        {
            std::vector<long long> maxInts = c.ints;
            for (int32_t k = 0; k < 3; ++k)
            {
                maxInts[k] = max[0].d[k]; // B, H, W
            }
            nvk_stub_call const* call = nvk_stub_last_call();
            check(call != nullptr && c.fn + "_workspace_size" == call->fn, "did not ask " + c.fn + "_workspace_size");
            check(call != nullptr && std::vector<long long>(call->ints, call->ints + call->nb_ints) == maxInts,
                "did not ask for the profile's max shape");
            size_t const atMax = nvk_stub_workspace_size(c.fn.c_str(), maxInts.data(), static_cast<int>(maxInts.size()), NVK_F16);
            size_t const atRun = nvk_stub_workspace_size(c.fn.c_str(), c.ints.data(), static_cast<int>(c.ints.size()), NVK_F16);
            check(size >= atMax && atMax > 0, std::to_string(size) + " bytes < the C library's " + std::to_string(atMax) + " at the max shape");
            check(size >= atRun, "less than the C library needs at the run shape");
        }
        else
        {
            check(size == 0, "an op without scratch asks for " + std::to_string(size) + " bytes");
        }
    }
    {
        Group g(name + " enqueue");
        for (DataType dt : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
        {
            checkEnqueue(p, c, dt, "type " + std::to_string(static_cast<int>(dt)));
        }
        std::vector<PluginTensorDesc> in(nIn);
        std::vector<void const*> ptrs(nIn, nullptr);
        for (int32_t i = 0; i < nIn; ++i)
        {
            in[i] = PluginTensorDesc{c.in[i], DataType::kINT8, TensorFormat::kLINEAR, 1.F};
        }
        PluginTensorDesc out{c.out, DataType::kINT8, TensorFormat::kLINEAR, 1.F};
        void* outs[] = {nullptr};
        nvk_stub_reset();
        check(cp.runtime->enqueue(in.data(), &out, ptrs.data(), outs, nullptr, nullptr) != 0 && nvk_stub_nb_calls() == 0
                && gLogger.hasError(),
            "INT8 enqueue not rejected before the C library, or not logged");
        for (auto& d : in)
        {
            d.type = DataType::kHALF;
        }
        out.type = DataType::kHALF;
        gLogger.entries.clear();
        nvk_stub_fail_next(NVK_ERR_CUDA, "stub failure 4711");
        check(cp.runtime->enqueue(in.data(), &out, ptrs.data(), outs, nullptr, nullptr) != 0, "a C library error was not returned");
        check(gLogger.has(ILogger::Severity::kERROR, "stub failure 4711"), "nvk_last_error() not logged" + gLogger.dump());
    }
    {
        Group g(name + " getFieldsToSerialize -> createPlugin(kRUNTIME)");
        PluginFieldCollection const* fc = cp.runtime->getFieldsToSerialize();
        check(fc != nullptr && fc->nbFields == static_cast<int32_t>(c.fields.size()), "wrong number of serialized fields");
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields && i < static_cast<int32_t>(c.fields.size()); ++i)
        {
            PluginField const& f = fc->fields[i];
            check(f.name != nullptr && c.fields[i].first == f.name && f.type == PluginFieldType::kINT32 && f.length == 1
                    && *static_cast<int32_t const*>(f.data) == c.fields[i].second,
                "serialized field " + std::to_string(i) + " is not " + c.fields[i].first + " = " + std::to_string(c.fields[i].second));
        }
        IPluginV3* q = fc != nullptr ? creator->createPlugin("layer", fc, TensorRTPhase::kRUNTIME) : nullptr;
        check(q != nullptr, "createPlugin(kRUNTIME) rejected the serialized fields" + gLogger.dump());
        if (q != nullptr)
        {
            checkEnqueue(q, c, DataType::kHALF, "deserialized");
            delete q;
        }
    }
    {
        Group g(name + " clone, attachToContext");
        IPluginV3* cl = p->clone();
        TestResourceContext ctx;
        nvk_stub_reset();
        IPluginV3* attached = cp.runtime->attachToContext(&ctx);
        nvk_stub_call const* call = nvk_stub_last_call();
        check(call != nullptr && std::string(call->fn) == "nvk_load", "attachToContext did not load the kernels");
        check(cl != nullptr && cl != p && attached != nullptr && attached != p, "clone / attachToContext returned no new plugin");
        delete p; // the copies must not refer to it
        p = nullptr;
        for (IPluginV3* q : {cl, attached})
        {
            if (q != nullptr)
            {
                checkEnqueue(q, c, DataType::kBF16, q == cl ? "clone" : "attached");
                PluginFieldCollection const* fc = caps(q).runtime->getFieldsToSerialize();
                check(fc != nullptr && fc->nbFields == static_cast<int32_t>(c.fields.size()), "copy lost its fields");
                delete q;
            }
        }
    }
}

//! Field validation of one creator, from the valid fields of its first case.
void checkBadFields(Library const& lib, Case const& c)
{
    Group g(c.plugin + " field validation");
    IPluginCreatorV3One* creator = creatorOf(lib, c.plugin);
    if (creator == nullptr)
    {
        return;
    }
    auto create = [&](FieldSet& fs) {
        IPluginV3* p = creator->createPlugin("layer", fs.fc(), TensorRTPhase::kBUILD);
        bool const ok = p != nullptr;
        delete p;
        return ok;
    };
    auto rejected = [&](FieldSet& fs, std::string const& what, std::string const& logged) {
        gLogger.entries.clear();
        check(!create(fs), what + " accepted");
        check(gLogger.has(ILogger::Severity::kERROR, logged), what + ": no error naming '" + logged + "'" + gLogger.dump());
    };
    // the case's fields with field `skip` left out
    auto fieldsBut = [&](size_t skip) {
        FieldSet fs;
        for (size_t i = 0; i < c.fields.size(); ++i)
        {
            if (i != skip)
            {
                fs.i32(c.fields[i].first.c_str(), c.fields[i].second);
            }
        }
        return fs;
    };
    {
        FieldSet fs = fieldsBut(c.fields.size());
        fs.i32("no_such_field", 1);
        gLogger.entries.clear();
        check(create(fs), "an unknown extra field made createPlugin fail");
        check(gLogger.has(ILogger::Severity::kWARNING, "no_such_field"), "unknown field not warned about");
    }
    if (c.fields.empty())
    {
        IPluginV3* p = creator->createPlugin("layer", nullptr, TensorRTPhase::kBUILD);
        check(p != nullptr, "no fields, null collection rejected");
        delete p;
        return;
    }
    gLogger.entries.clear();
    check(creator->createPlugin("layer", nullptr, TensorRTPhase::kBUILD) == nullptr && gLogger.hasError(),
        "null field collection accepted or not logged");
    for (size_t i = 0; i < c.fields.size(); ++i)
    {
        std::string const fname = c.fields[i].first;
        char const* n = c.fields[i].first.c_str();
        Range const range = kRANGES.at(fname);
        {
            FieldSet fs = fieldsBut(i);
            rejected(fs, "missing " + fname, fname);
        }
        {
            FieldSet fs = fieldsBut(i);
            fs.f32(n, static_cast<float>(c.fields[i].second));
            rejected(fs, fname + " as kFLOAT32", fname);
        }
        {
            FieldSet fs = fieldsBut(i);
            static int32_t const two[2] = {1, 1};
            fs.add(n, two, PluginFieldType::kINT32, 2);
            rejected(fs, fname + " of length 2", fname);
        }
        {
            FieldSet fs = fieldsBut(i);
            fs.add(n, nullptr, PluginFieldType::kINT32, 1);
            rejected(fs, fname + " without data", fname);
        }
        {
            FieldSet fs = fieldsBut(i);
            fs.i32(n, range.min - 1);
            rejected(fs, fname + " = " + std::to_string(range.min - 1), fname);
        }
        if (range.max != std::numeric_limits<int32_t>::max())
        {
            FieldSet fs = fieldsBut(i);
            fs.i32(n, range.max + 1);
            rejected(fs, fname + " = " + std::to_string(range.max + 1), fname);
        }
        {
            // narrowed to int32 this is the valid value again
            int64_t const wide = (int64_t{1} << 32) + c.fields[i].second;
            FieldSet fs = fieldsBut(i);
            fs.i64(n, wide);
            rejected(fs, fname + " = " + std::to_string(wide) + " (kINT64)", std::to_string(wide));
        }
        {
            FieldSet fs = fieldsBut(i);
            fs.i64(n, c.fields[i].second);
            IPluginV3* p = creator->createPlugin("layer", fs.fc(), TensorRTPhase::kBUILD);
            check(p != nullptr, "a valid kINT64 " + fname + " rejected" + gLogger.dump());
            if (p != nullptr)
            {
                PluginFieldCollection const* fc = caps(p).runtime->getFieldsToSerialize();
                bool found = false;
                for (int32_t k = 0; fc != nullptr && k < fc->nbFields; ++k)
                {
                    found = found
                        || (fname == fc->fields[k].name && fc->fields[k].type == PluginFieldType::kINT32
                            && *static_cast<int32_t const*>(fc->fields[k].data) == c.fields[i].second);
                }
                check(found, "a kINT64 " + fname + " is not serialized as the same kINT32");
                delete p;
            }
        }
    }
}

void checkLibrary(Library const& lib, Nvinfer const& nv)
{
    {
        Group g("heap allocation counter");
#if NVTRT_COUNT_ALLOCS
        auto volatile alloc = &std::malloc;
        gNbAllocs = 0;
        gCountAllocs = true;
        std::free(alloc(32));
        gCountAllocs = false;
        check(gNbAllocs == 1, "the harness does not see malloc");
#else
        std::printf("note: heap allocations are not counted under AddressSanitizer\n");
#endif
    }
    std::vector<Case> const all = cases();
    {
        Group g("getCreators");
        auto const cs = creators(lib);
        int32_t n = -1;
        lib.getCreators(n);
        std::set<std::string> expected;
        for (auto const& c : all)
        {
            expected.insert(c.plugin);
        }
        check(n == static_cast<int32_t>(expected.size()) && cs.size() == expected.size(), "expected " + std::to_string(expected.size()) + " V3One creators, got " + std::to_string(n));
        for (auto const& name : expected)
        {
            check(cs.count(name) == 1, "no creator " + name);
        }
        for (auto const& kv : cs)
        {
            check(std::string(kv.second->getPluginVersion()) == "1", kv.first + ": version");
            check(std::string(kv.second->getPluginNamespace()) == "nextvit", kv.first + ": namespace");
        }
    }
    std::set<std::string> seen;
    for (size_t i = 0; i < all.size(); ++i)
    {
        if (seen.insert(all[i].plugin).second)
        {
            checkBadFields(lib, all[i]);
        }
        checkCase(lib, all[i], static_cast<int>(i));
    }
    {
        Group g("setLoggerFinder(nullptr) keeps the logger");
        lib.setLoggerFinder(nullptr);
        FieldSet fs;
        IPluginCreatorV3One* creator = creatorOf(lib, "NextViTConvBnRelu");
        check(creator != nullptr && creator->createPlugin("layer", fs.fc(), TensorRTPhase::kBUILD) == nullptr, "missing stride accepted");
        check(gLogger.has(ILogger::Severity::kERROR, "stride"), "the error did not reach the logger set before");
    }
    {
        Group g("a host of another TensorRT major gets no creators and keeps its logger finder away");
        nv.setVersion(static_cast<int32_t>(NV_TENSORRT_VERSION_INT(NV_TENSORRT_MAJOR + 1, 0, 0)));
        int32_t n = -1;
        IPluginCreatorInterface* const* list = lib.getCreators(n);
        check(n == 0 && list == nullptr, "creators handed to a TensorRT " + std::to_string(NV_TENSORRT_MAJOR + 1) + " host");
        TestLogger other;
        TestFinder otherFinder(&other);
        lib.setLoggerFinder(&otherFinder);
        nv.setVersion(static_cast<int32_t>(NV_TENSORRT_VERSION));
        FieldSet fs;
        IPluginCreatorV3One* creator = creatorOf(lib, "NextViTPatchEmbed");
        check(creator != nullptr && creator->createPlugin("layer", fs.fc(), TensorRTPhase::kBUILD) == nullptr, "missing stride accepted");
        check(other.entries.empty(), "the other major's logger finder was used");
        check(gLogger.hasError(), "the logger set before was dropped");
        check(lib.getCreators(n) != nullptr && n == 6, "creators not back for the right major");
    }
}

void describe(Library const& lib)
{
    int32_t n = 0;
    IPluginCreatorInterface* const* list = lib.getCreators(n);
    std::printf("{\"major\": %d, \"creators\": [", NV_TENSORRT_MAJOR);
    for (int32_t i = 0; list != nullptr && i < n; ++i)
    {
        InterfaceInfo const info = list[i]->getInterfaceInfo();
        std::printf("%s{\"interface\": \"%s\"", i ? ", " : "", info.kind);
        if (std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0)
        {
            auto* c = static_cast<IPluginCreatorV3One*>(list[i]);
            std::printf(", \"name\": \"%s\", \"version\": \"%s\", \"namespace\": \"%s\", \"fields\": [", c->getPluginName(),
                c->getPluginVersion(), c->getPluginNamespace());
            PluginFieldCollection const* fc = c->getFieldNames();
            for (int32_t k = 0; fc != nullptr && k < fc->nbFields; ++k)
            {
                PluginField const& f = fc->fields[k];
                std::printf("%s{\"name\": \"%s\", \"type\": \"%s\", \"length\": %d}", k ? ", " : "", f.name,
                    fieldTypeName(f.type), static_cast<int>(f.length));
            }
            std::printf("]");
        }
        std::printf("}");
    }
    std::printf("]}\n");
}

//! The names of the plugins the library must have (every plugin of cases()).
std::set<std::string> pluginNames()
{
    std::set<std::string> names;
    for (auto const& c : cases())
    {
        names.insert(c.plugin);
    }
    return names;
}

std::string dlError()
{
    char const* why = dlerror();
    return why != nullptr ? why : "?";
}

//! False, with a failed check, when `path` is still loaded: its static destructors have not run.
bool unloaded(char const* path)
{
    void* const still = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    check(still == nullptr, std::string(path) + " is still loaded after its last dlclose");
    if (still != nullptr)
    {
        dlclose(still);
    }
    return still == nullptr;
}

//! The registry holds exactly `expected`'s creators, each once, each under the namespace it
//! reports ("nextvit"), version "1", as the library's own creators `mine` (nullptr: any).
void checkRegistered(IPluginRegistry& registry, std::set<std::string> const& expected, Library const* mine)
{
    std::vector<IPluginCreatorInterface*> const all = registeredCreators(registry);
    check(all.size() == expected.size(),
        std::to_string(all.size()) + " creators registered instead of " + std::to_string(expected.size()));
    std::map<std::string, IPluginCreatorV3One*> const own
        = mine != nullptr ? creators(*mine) : std::map<std::string, IPluginCreatorV3One*>{};
    for (auto const& name : expected)
    {
        IPluginCreatorInterface* const c = registry.getCreator(name.c_str(), "1", "nextvit");
        check(c != nullptr, name + " version 1 is not registered under namespace nextvit");
        if (c == nullptr)
        {
            continue;
        }
        check(std::count(all.begin(), all.end(), c) == 1, name + " is registered more than once");
        check(std::strcmp(c->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, name + " is not a V3One creator");
        check(std::string(static_cast<IPluginCreatorV3One*>(c)->getPluginNamespace()) == "nextvit",
            name + " registered under nextvit reports another namespace");
        check(mine == nullptr || (own.count(name) == 1 && own.at(name) == c), name + ": not the creator getCreators hands out");
    }
}

//! (a) A host that only dlopens the library (Triton's TensorRT backend, trtexec
//! --staticPlugins), its libnvinfer loaded RTLD_LOCAL before, out of the global scope: the
//! library finds it by SONAME, registers every creator under "nextvit", deregisters them when
//! unloaded. A host of another major gets nothing registered.
void checkDlopenOnly(char const* path)
{
    Nvinfer const nv = loadNvinfer(RTLD_LOCAL);
    std::set<std::string> const expected = pluginNames();
    {
        Group g("dlopen: the host's libnvinfer is out of the global scope");
        check(dlsym(RTLD_DEFAULT, "getPluginRegistry") == nullptr && dlsym(RTLD_DEFAULT, "getInferLibVersion") == nullptr,
            "getPluginRegistry / getInferLibVersion reachable through the global scope: the SONAME look-up is not tested");
        check(registeredCreators(*nv.registry).empty(), "the registry is not empty before the library is loaded");
    }
    {
        Group g("dlopen under a TensorRT of another major registers nothing");
        nv.setVersion(static_cast<int32_t>(NV_TENSORRT_VERSION_INT(NV_TENSORRT_MAJOR + 1, 0, 0)));
        void* const h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        nv.setVersion(static_cast<int32_t>(NV_TENSORRT_VERSION));
        check(h != nullptr, "dlopen failed: " + dlError());
        check(registeredCreators(*nv.registry).empty(), "creators registered with a TensorRT of another major");
        if (h != nullptr)
        {
            dlclose(h);
            unloaded(path);
        }
        check(registeredCreators(*nv.registry).empty() && nv.failures() == 0, "the unload touched the registry");
    }
    void* const h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    {
        Group g("dlopen registers every creator under namespace nextvit");
        check(h != nullptr, "dlopen failed: " + dlError());
        checkRegistered(*nv.registry, expected, nullptr);
        check(nv.failures() == 0, std::to_string(nv.failures()) + " registry calls refused");
    }
    {
        Group g("dlclose deregisters them");
        if (h != nullptr)
        {
            dlclose(h);
            unloaded(path);
        }
        // only counted: the creators' code is unmapped
        check(registeredCreators(*nv.registry).empty(),
            std::to_string(registeredCreators(*nv.registry).size()) + " creators left registered after dlclose");
        check(nv.failures() == 0, std::to_string(nv.failures()) + " registry calls refused");
    }
}

//! (b) IPluginRegistry::loadLibrary's way, after the library registered itself on dlopen:
//! setLoggerFinder, getCreators, registerCreator for each; then deregisterLibrary's way. Each
//! creator ends up registered exactly once, no registry call is refused, nothing is logged.
void checkLoadLibrary(char const* path)
{
    Nvinfer const nv = loadNvinfer(RTLD_GLOBAL); // trtexec links libnvinfer
    std::set<std::string> const expected = pluginNames();
    Library const lib = openOrExit(path);
    {
        Group g("loadLibrary: setLoggerFinder, getCreators, registerCreator each");
        check(registeredCreators(*nv.registry).size() == expected.size(), "the library did not register itself on dlopen");
        lib.setLoggerFinder(&gFinder);
        int32_t n = -1;
        IPluginCreatorInterface* const* list = lib.getCreators(n);
        check(list != nullptr && n == static_cast<int32_t>(expected.size()), "getCreators handed out " + std::to_string(n));
        for (int32_t i = 0; list != nullptr && i < n; ++i)
        {
            // loadLibrary registers a creator under the namespace it reports
            auto* c = static_cast<IPluginCreatorV3One*>(list[i]);
            check(nv.registry->registerCreator(*c, c->getPluginNamespace()),
                std::string("registerCreator refused ") + c->getPluginName() + " (still registered from the dlopen?)");
        }
        checkRegistered(*nv.registry, expected, &lib);
        check(nv.failures() == 0, std::to_string(nv.failures()) + " registry calls refused");
        check(!gLogger.hasError(), "errors logged:" + gLogger.dump());
    }
    {
        Group g("a later getCreators leaves loadLibrary's registrations alone");
        int32_t n = -1;
        check(lib.getCreators(n) != nullptr && n == static_cast<int32_t>(expected.size()), "getCreators failed");
        checkRegistered(*nv.registry, expected, &lib);
        check(nv.failures() == 0 && !gLogger.hasError(), "a registry call refused or an error logged:" + gLogger.dump());
    }
    {
        Group g("deregisterLibrary: deregisterCreator each, dlclose; nothing deregistered twice");
        for (auto const& kv : creators(lib))
        {
            check(nv.registry->deregisterCreator(*kv.second), kv.first + " could not be deregistered");
        }
        dlclose(lib.handle);
        unloaded(path);
        check(registeredCreators(*nv.registry).empty(), "creators left registered");
        check(nv.failures() == 0, std::to_string(nv.failures()) + " registry calls refused (the unload deregistered "
            "what loadLibrary owned?)");
    }
}

//! (c) No libnvinfer in the process: dlopen works, registers nothing, getCreators hands out
//! every creator. A TensorRT loaded afterwards is left alone, by getCreators and by the unload.
void checkWithoutNvinfer(char const* path)
{
    std::set<std::string> const expected = pluginNames();
    Group g("no libnvinfer: dlopen, getCreators, dlclose");
    void* const present = dlopen(kNVINFER_SONAME, RTLD_NOW | RTLD_NOLOAD);
    check(present == nullptr && dlsym(RTLD_DEFAULT, "getPluginRegistry") == nullptr,
        "a libnvinfer / getPluginRegistry is in the process already");
    Library const lib = openOrExit(path);
    lib.setLoggerFinder(&gFinder);
    auto const cs = creators(lib);
    check(cs.size() == expected.size(), "getCreators handed out " + std::to_string(cs.size()) + " V3One creators");
    Nvinfer const nv = loadNvinfer(RTLD_LOCAL);
    check(registeredCreators(*nv.registry).empty(), "creators registered in a libnvinfer loaded after the library");
    check(creators(lib).size() == expected.size(), "getCreators failed with a libnvinfer loaded");
    dlclose(lib.handle);
    unloaded(path);
    check(registeredCreators(*nv.registry).empty() && nv.failures() == 0,
        "a registry loaded after the library was touched: " + std::to_string(nv.failures()) + " calls refused");
    check(!gLogger.hasError(), "errors logged:" + gLogger.dump());
}
} // namespace

int main(int argc, char** argv)
{
    std::string const mode = argc == 3 ? argv[1] : "";
    if (mode == "dlopen")
    {
        checkDlopenOnly(argv[2]);
    }
    else if (mode == "loadlibrary")
    {
        checkLoadLibrary(argv[2]);
    }
    else if (mode == "no-nvinfer")
    {
        checkWithoutNvinfer(argv[2]);
    }
    else if (mode == "describe" || mode == "check")
    {
        Nvinfer const nv = loadNvinfer(RTLD_GLOBAL); // as in trtexec, which links libnvinfer
        Library const lib = openOrExit(argv[2]);
        lib.setLoggerFinder(&gFinder); // TensorRT's order: the logger first, then the creators
        if (mode == "describe")
        {
            describe(lib);
            return 0;
        }
        checkLibrary(lib, nv);
    }
    else
    {
        std::fprintf(stderr, "usage: %s describe|check|dlopen|loadlibrary|no-nvinfer <plugin library>\n", argv[0]);
        return 2;
    }
    std::printf("%d failed checks\n", gFailures);
    return gFailures == 0 ? 0 : 1;
}
