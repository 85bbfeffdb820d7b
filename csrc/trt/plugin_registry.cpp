/*
 * Entry points of libnextvit_trt_plugins_trt<major>.so, and its registration at load time.
 *
 * TensorRT's hosts reach a plugin library in one of two ways, and this one library serves both:
 *
 *  1. dlopen alone: Triton Inference Server's TensorRT backend
 *     (--backend-config=tensorrt,plugins=libnextvit_trt_plugins_trt<major>.so), trtexec
 *     --staticPlugins, ctypes.CDLL. Nothing of the library is called, so a static initializer
 *     registers the creators with the host's plugin registry, under the namespace they report
 *     ("nextvit"; REGISTER_TENSORRT_PLUGIN would register them under ""). The library is built
 *     from the headers alone (no libnvinfer linked), so the registry is found at run time:
 *     getPluginRegistry of the libnvinfer.so.<major> already in the process, whatever scope it
 *     was loaded in (dlopen RTLD_NOLOAD by its SONAME finds one loaded RTLD_LOCAL, e.g. as a
 *     dependency of Triton's backend), else any getPluginRegistry in the global scope. No
 *     libnvinfer loaded: nothing is registered. Unloading the library deregisters what it
 *     registered itself (when that registry is still there), so no creator outlives its code.
 *
 *  2. IPluginRegistry::loadLibrary (trtexec --dynamicPlugins,
 *     tensorrt.get_plugin_registry().load_library(), the ONNX parser's plugin libraries):
 *     TensorRT dlopens the library (so 1. has happened) and then calls
 *       setLoggerFinder(ILoggerFinder*)          -- so plugins log through the application logger
 *       getCreators(int32_t& nbCreators)         -- the IPluginCreatorV3One creators of the library
 *     and registers what getCreators returns itself; loadLibrary "will fail ... if any of the
 *     plugins are already registered" (NvInferRuntimeCommon.h). So getCreators first withdraws
 *     the registration of 1.: from then on the creators are the caller's to register and
 *     deregister (IPluginRegistry::deregisterLibrary), and unloading the library leaves them be.
 *     (getPluginCreators() is the IPluginCreator/IPluginV2 variant: this library has none.)
 *
 * The ABI of ILogger / ILoggerFinder differs between TensorRT majors (from 11 they derive from
 * IVersionedInterface), so a library serves only the major of the headers it was built with
 * (its file name says which). When the host's getInferLibVersion is found (as getPluginRegistry
 * is), a host of another major gets no creators, registered or handed out, and its logger finder
 * is not used: an error on stderr instead of silently lost log messages or a crash in the first
 * logging call.
 *
 * Only getCreators and setLoggerFinder are exported (exports.map).
 */
#include "NvInferRuntime.h"
#include "NvInferVersion.h"

#include "common/nextvitPluginCommon.h"
#include "convBnReluPlugin/convBnReluPlugin.h"
#include "eMhsaPlugin/eMhsaPlugin.h"
#include "headPlugin/headPlugin.h"
#include "mhcaPlugin/mhcaPlugin.h"
#include "mlpPlugin/mlpPlugin.h"
#include "patchEmbedPlugin/patchEmbedPlugin.h"

#include <array>
#include <cstdint>
#include <cstdio>
#include <dlfcn.h>
#include <mutex>
#include <string>

#if defined(_WIN32)
#define NEXTVIT_TRT_API __declspec(dllexport)
#else
#define NEXTVIT_TRT_API __attribute__((visibility("default")))
#endif

#define NEXTVIT_TRT_STR2(x) #x
#define NEXTVIT_TRT_STR(x) NEXTVIT_TRT_STR2(x)

using namespace nextvit::plugin;

namespace
{
constexpr int32_t kNB_CREATORS = 6;

nvinfer1::IPluginCreatorInterface* const* creatorList(int32_t& nbCreators) noexcept
{
    static ConvBnReluPluginCreator sConvBnRelu;
    static PatchEmbedPluginCreator sPatchEmbed;
    static MhcaPluginCreator sMhca;
    static MlpPluginCreator sMlp;
    static EMhsaPluginCreator sEMhsa;
    static HeadPluginCreator sHead;
    static nvinfer1::IPluginCreatorInterface* const sCreators[]
        = {&sConvBnRelu, &sPatchEmbed, &sMhca, &sMlp, &sEMhsa, &sHead};
    static_assert(sizeof(sCreators) / sizeof(sCreators[0]) == kNB_CREATORS, "kNB_CREATORS sizes the registration record");
    nbCreators = kNB_CREATORS;
    return sCreators;
}

//! Where a registration failure is reported: the host's logger once setLoggerFinder may have
//! handed it over, stderr where that logger may be gone (the library being unloaded).
enum class Report
{
    kLOGGER,
    kSTDERR
};

void reportFailure(Report where, char const* action, nvinfer1::IPluginCreatorInterface const& creator) noexcept
{
    try
    {
        // every creator of this library is an IPluginCreatorV3One
        std::string const msg = std::string(action) + " "
            + static_cast<nvinfer1::IPluginCreatorV3One const&>(creator).getPluginName() + " (namespace "
            + kNEXTVIT_PLUGIN_NAMESPACE + ") failed";
        if (where == Report::kLOGGER)
        {
            logError(msg);
        }
        else
        {
            std::fprintf(stderr, "[nextvit_trt_plugins] %s\n", msg.c_str());
        }
    }
    catch (...)
    {
    }
}

//! The SONAME of the libnvinfer of this build's major: the one whose registry and version count.
constexpr char const kNVINFER_SONAME[] = "libnvinfer.so." NEXTVIT_TRT_STR(NV_TENSORRT_MAJOR);

//! A function of the host's libnvinfer, looked up at run time (the library links none of it):
//! in the libnvinfer.so.<major> already loaded, in whatever scope (RTLD_NOLOAD never loads
//! one), else in the global scope (e.g. a host that exports the TensorRT C entry points
//! itself). nullptr when neither has it.
void* hostFunction(char const* name) noexcept
{
    void* fn = nullptr;
    if (void* nvinfer = dlopen(kNVINFER_SONAME, RTLD_NOW | RTLD_NOLOAD))
    {
        fn = dlsym(nvinfer, name);
        // RTLD_NOLOAD took a reference; the code stays mapped through whoever loaded it
        dlclose(nvinfer);
    }
    if (fn == nullptr)
    {
        fn = dlsym(RTLD_DEFAULT, name);
    }
    dlerror(); // a host checking dlerror() after its own dlopen must not see these lookups
    return fn;
}

nvinfer1::IPluginRegistry* hostRegistry() noexcept
{
    using GetRegistry = nvinfer1::IPluginRegistry* (*) ();
    auto const get = reinterpret_cast<GetRegistry>(hostFunction("getPluginRegistry"));
    return get != nullptr ? get() : nullptr;
}

//! False (with a message on stderr: the host's logger is not safe to call) when the process
//! holds a libnvinfer of another major than the headers of this build. Unknown (no
//! getInferLibVersion found, e.g. only a libnvinfer of another major loaded RTLD_LOCAL) counts
//! as a match.
bool hostMajorMatches(char const* entryPoint) noexcept
{
    using GetVersion = int32_t (*)();
    auto const getVersion = reinterpret_cast<GetVersion>(hostFunction("getInferLibVersion"));
    if (getVersion == nullptr)
    {
        return true;
    }
    int32_t const version = getVersion(); // (major * 100 + minor) * 100 + patch
    if (version / 10000 == NV_TENSORRT_MAJOR)
    {
        return true;
    }
    std::fprintf(stderr,
        "[nextvit_trt_plugins] %s: this library was built against the TensorRT %d headers but the process runs "
        "TensorRT %d.%d (getInferLibVersion %d): load the nextvit_trt_plugins library built for that major\n",
        entryPoint, NV_TENSORRT_MAJOR, static_cast<int>(version / 10000), static_cast<int>(version / 100 % 100),
        static_cast<int>(version));
    return false;
}

//! The creators this library registered itself when it was loaded, and with which registry:
//! registered by the constructor, withdrawn by the first getCreators (its caller registers them)
//! or by the destructor when the library is unloaded.
class SelfRegistration
{
public:
    SelfRegistration() noexcept
    {
        // the creators first, whether registered or not: constructed before this object, they are
        // destroyed after it, so the destructor deregisters live creators
        int32_t n = 0;
        nvinfer1::IPluginCreatorInterface* const* creators = creatorList(n);
        std::lock_guard<std::mutex> lock(mMutex);
        nvinfer1::IPluginRegistry* registry = hostMajorMatches("registration at load time") ? hostRegistry() : nullptr;
        if (registry == nullptr)
        {
            return; // no TensorRT in the process yet: getCreators / loadLibrary still work
        }
        for (int32_t i = 0; i < n; ++i)
        {
            if (registry->registerCreator(*creators[i], kNEXTVIT_PLUGIN_NAMESPACE))
            {
                mRegistered[mNbRegistered++] = creators[i];
            }
            else
            {
                // e.g. another copy of this library registered it first (no host logger yet: stderr)
                reportFailure(Report::kSTDERR, "registering, when the library was loaded,", *creators[i]);
            }
        }
        mRegistry = mNbRegistered > 0 ? registry : nullptr;
    }

    ~SelfRegistration()
    {
        withdraw(Report::kSTDERR); // the host's logger may be gone by now
    }

    SelfRegistration(SelfRegistration const&) = delete;
    SelfRegistration& operator=(SelfRegistration const&) = delete;

    //! Deregisters what the constructor registered, if that registry is still the host's (a
    //! libnvinfer unloaded since took its registry, and these registrations, with it); a creator
    //! the registry would not deregister is reported to `where`.
    void withdraw(Report where) noexcept
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (mNbRegistered == 0)
        {
            return;
        }
        if (hostRegistry() == mRegistry)
        {
            for (int32_t i = 0; i < mNbRegistered; ++i)
            {
                if (!mRegistry->deregisterCreator(*mRegistered[i]))
                {
                    reportFailure(where, "deregistering, as registered when the library was loaded,", *mRegistered[i]);
                }
            }
        }
        mNbRegistered = 0;
        mRegistry = nullptr;
    }

private:
    std::mutex mMutex;
    nvinfer1::IPluginRegistry* mRegistry{nullptr};
    std::array<nvinfer1::IPluginCreatorInterface*, kNB_CREATORS> mRegistered{};
    int32_t mNbRegistered{0};
};

SelfRegistration sSelfRegistration;
} // namespace

extern "C"
{
    NEXTVIT_TRT_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
    {
        if (hostMajorMatches("setLoggerFinder"))
        {
            nextvit::plugin::setLoggerFinder(finder);
        }
    }

    NEXTVIT_TRT_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
    {
        if (!hostMajorMatches("getCreators"))
        {
            nbCreators = 0;
            return nullptr;
        }
        // the caller registers the creators (loadLibrary does, and fails on any registered already)
        sSelfRegistration.withdraw(Report::kLOGGER);
        return creatorList(nbCreators);
    }
}
