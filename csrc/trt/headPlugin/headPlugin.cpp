/*
 * NextViTHead plugin and creator (see headPlugin.h).
 */
#include "headPlugin.h"

using namespace nvinfer1;

namespace nextvit
{
namespace plugin
{

HeadPlugin::HeadPlugin(std::string const& layerName)
    : NextViTPluginBase(layerName, {})
{
}

IPluginV3* HeadPlugin::clone() noexcept
{
    try
    {
        return new HeadPlugin(*this);
    }
    catch (...)
    {
        return nullptr;
    }
}

char const* HeadPlugin::getPluginName() const noexcept
{
    return kHEAD_PLUGIN_NAME;
}

int32_t HeadPlugin::expectedNbInputs() const noexcept
{
    return 3;
}

int32_t HeadPlugin::outputRank() const noexcept
{
    return 2;
}

std::string HeadPlugin::checkInputs(Dims const* d, int32_t /*nbInputs*/) const
{
    if (d[0].nbDims != 4 || d[1].nbDims != 2 || d[2].nbDims != 1)
    {
        return "expected x [B,H,W,C], w [N,C], b [N]; got " + dimsToString(d[0]) + ", " + dimsToString(d[1]) + ", "
            + dimsToString(d[2]);
    }
    if ((known(d[0].d[3]) && known(d[1].d[1]) && d[0].d[3] != d[1].d[1])
        || (known(d[1].d[0]) && known(d[2].d[0]) && d[1].d[0] != d[2].d[0]))
    {
        return "weights do not match: x " + dimsToString(d[0]) + ", w " + dimsToString(d[1]) + ", b "
            + dimsToString(d[2]);
    }
    return {};
}

int32_t HeadPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != 3 || nbOutputs != 1 || inputs[0].nbDims != 4
        || inputs[1].nbDims != 2)
    {
        return 1;
    }
    outputs[0].nbDims = 2;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = inputs[1].d[0];
    return 0;
}

int32_t HeadPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    nvk_dtype dt{};
    if (!toNvkDtype(inputDesc[0].type, dt))
    {
        logError(mLayerName + ": unsupported data type");
        return 1;
    }
    Dims const& x = inputDesc[0].dims;
    nvk_status const st = nvk_head(inputs[0], inputs[1], inputs[2], outputs[0], dim(x, 0), dim(x, 1), dim(x, 2),
        dim(x, 3), dim(inputDesc[1].dims, 0), dt, static_cast<void*>(stream));
    return checkNvk(st, "nvk_head", mLayerName);
}

// ------------------------------------------------------------------ creator
HeadPluginCreator::HeadPluginCreator()
{
    mPluginAttributes.clear(); // no fields
    finalizeFields();
}

char const* HeadPluginCreator::getPluginName() const noexcept
{
    return kHEAD_PLUGIN_NAME;
}

IPluginV3* HeadPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        std::vector<IntField> fields{};
        if (!readIntFields(fc, fields, kHEAD_PLUGIN_NAME))
        {
            return nullptr;
        }
        return new HeadPlugin(name != nullptr ? name : "");
    }
    catch (...)
    {
        return nullptr;
    }
}

} // namespace plugin
} // namespace nextvit
