/*
 * Entry points of libnextvit_trt_plugins.so.
 *
 * TensorRT 10+ loads a plugin library with IPluginRegistry::loadLibrary() (trtexec
 * --dynamicPlugins / --staticPlugins, tensorrt.get_plugin_registry().load_library(), the
 * ONNX parser's plugin libraries) and then calls
 *   setLoggerFinder(ILoggerFinder*)          -- so plugins log through the application logger
 *   getCreators(int32_t& nbCreators)         -- the IPluginCreatorV3One creators of the library
 * (getPluginCreators() is the IPluginCreator/IPluginV2 variant: this library has none).
 *
 * With NEXTVIT_TRT_STATIC_REGISTRATION defined (CMake option of the same name) the creators
 * are also registered when the library is merely dlopen()ed (REGISTER_TENSORRT_PLUGIN), for
 * hosts that load it with ctypes.CDLL / dlopen instead of loadLibrary. Do not combine that
 * with loadLibrary on the same library: the creators would be registered twice.
 */
#include "NvInferRuntime.h"

#include "common/nextvitPluginCommon.h"
#include "convBnReluPlugin/convBnReluPlugin.h"
#include "eMhsaPlugin/eMhsaPlugin.h"
#include "headPlugin/headPlugin.h"
#include "mhcaPlugin/mhcaPlugin.h"
#include "mlpPlugin/mlpPlugin.h"
#include "patchEmbedPlugin/patchEmbedPlugin.h"

#include <cstdint>

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
} // namespace

extern "C"
{
    NEXTVIT_TRT_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
    {
        nextvit::plugin::setLoggerFinder(finder);
    }

    NEXTVIT_TRT_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
    {
        return creatorList(nbCreators);
    }
}

#ifdef NEXTVIT_TRT_STATIC_REGISTRATION
REGISTER_TENSORRT_PLUGIN(ConvBnReluPluginCreator);
REGISTER_TENSORRT_PLUGIN(PatchEmbedPluginCreator);
REGISTER_TENSORRT_PLUGIN(MhcaPluginCreator);
REGISTER_TENSORRT_PLUGIN(MlpPluginCreator);
REGISTER_TENSORRT_PLUGIN(EMhsaPluginCreator);
REGISTER_TENSORRT_PLUGIN(HeadPluginCreator);
#endif
