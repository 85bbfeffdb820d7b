/*
 * Entry points of libnextvit_trt_plugins_trt<major>.so.
 *
 * TensorRT 10+ loads a plugin library with IPluginRegistry::loadLibrary() (trtexec
 * --dynamicPlugins / --staticPlugins, tensorrt.get_plugin_registry().load_library(), the
 * ONNX parser's plugin libraries) and then calls
 *   setLoggerFinder(ILoggerFinder*)          -- so plugins log through the application logger
 *   getCreators(int32_t& nbCreators)         -- the IPluginCreatorV3One creators of the library
 * (getPluginCreators() is the IPluginCreator/IPluginV2 variant: this library has none).
 *
 * The ABI of ILogger / ILoggerFinder differs between TensorRT majors (from 11 they derive from
 * IVersionedInterface), so a library serves only the major of the headers it was built with
 * (its file name says which). When the host's libnvinfer is visible (getInferLibVersion), a
 * host of another major gets no creators and its logger finder is not used: an error on
 * stderr instead of silently lost log messages or a crash in the first logging call.
 *
 * Only these entry points are exported (exports.map). With NEXTVIT_TRT_STATIC_REGISTRATION
 * defined (CMake option of the same name) the creators are also registered with the host's
 * getPluginRegistry() when the library is merely dlopen()ed, for hosts that load it with
 * ctypes.CDLL / dlopen instead of loadLibrary, under the namespace the creators report
 * ("nextvit"; REGISTER_TENSORRT_PLUGIN would register them under ""). Do not combine that with
 * loadLibrary on the same library: the creators would be registered twice.
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

#include <cstdint>
#include <cstdio>
#include <dlfcn.h>
#include <string>

#if defined(_WIN32)
#define NEXTVIT_TRT_API __declspec(dllexport)
#else
#define NEXTVIT_TRT_API __attribute__((visibility("default")))
#endif

using namespace nextvit::plugin;

namespace
{
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
    nbCreators = static_cast<int32_t>(sizeof(sCreators) / sizeof(sCreators[0]));
    return sCreators;
}

//! False (with a message on stderr: the host's logger is not safe to call) when the process
//! holds a libnvinfer of another major than the headers of this build. Unknown (no
//! getInferLibVersion in the global scope, e.g. libnvinfer loaded RTLD_LOCAL) counts as a match.
bool hostMajorMatches(char const* entryPoint) noexcept
{
    using GetVersion = int32_t (*)();
    auto const getVersion = reinterpret_cast<GetVersion>(dlsym(RTLD_DEFAULT, "getInferLibVersion"));
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
        return creatorList(nbCreators);
    }
}

#ifdef NEXTVIT_TRT_STATIC_REGISTRATION
namespace
{
struct StaticRegistration
{
    StaticRegistration()
    {
        nvinfer1::IPluginRegistry* registry = hostMajorMatches("static registration") ? getPluginRegistry() : nullptr;
        if (registry == nullptr)
        {
            return;
        }
        int32_t n = 0;
        nvinfer1::IPluginCreatorInterface* const* creators = creatorList(n);
        for (int32_t i = 0; i < n; ++i)
        {
            if (!registry->registerCreator(*creators[i], kNEXTVIT_PLUGIN_NAMESPACE))
            {
                logError(std::string("static registration of ") + creators[i]->getInterfaceInfo().kind + " #"
                    + std::to_string(i) + " failed");
            }
        }
    }
};
StaticRegistration const sStaticRegistration;
} // namespace
#endif
