/*
 * NextViTMHCA plugin and creator (see mhcaPlugin.h).
 */
#include "mhcaPlugin.h"

using namespace nvinfer1;

namespace nextvit
{
namespace plugin
{
namespace
{
constexpr int64_t kHEAD_DIM{32};
}

MhcaPlugin::MhcaPlugin(std::string const& layerName, int32_t residual)
    : NextViTPluginBase(layerName, {{"residual", residual}})
{
}

IPluginV3* MhcaPlugin::clone() noexcept
{
    try
    {
        return new MhcaPlugin(*this);
    }
    catch (...)
    {
        return nullptr;
    }
}

char const* MhcaPlugin::getPluginName() const noexcept
{
    return kMHCA_PLUGIN_NAME;
}

int32_t MhcaPlugin::expectedNbInputs() const noexcept
{
    return 4;
}

std::string MhcaPlugin::checkInputs(Dims const* d, int32_t /*nbInputs*/) const
{
    if (d[0].nbDims != 4 || d[1].nbDims != 4 || d[2].nbDims != 1 || d[3].nbDims != 2)
    {
        return "expected x [B,H,W,C], conv_w [C,32,3,3], conv_b [C], proj_w [Cout,C]; got " + dimsToString(d[0])
            + ", " + dimsToString(d[1]) + ", " + dimsToString(d[2]) + ", " + dimsToString(d[3]);
    }
    int64_t const c = d[0].d[3];
    if (known(c) && c % kHEAD_DIM != 0)
    {
        return "x has " + std::to_string(c) + " channels, not a multiple of 32";
    }
    if (known(d[1].d[1]) && (d[1].d[1] != kHEAD_DIM || d[1].d[2] != 3 || d[1].d[3] != 3))
    {
        return "conv_w must be [C, 32, 3, 3], got " + dimsToString(d[1]);
    }
    if (known(c) && ((known(d[1].d[0]) && d[1].d[0] != c) || (known(d[2].d[0]) && d[2].d[0] != c)
                        || (known(d[3].d[1]) && d[3].d[1] != c)))
    {
        return "weights do not match the " + std::to_string(c) + " input channels: conv_w " + dimsToString(d[1])
            + ", conv_b " + dimsToString(d[2]) + ", proj_w " + dimsToString(d[3]);
    }
    if (field("residual") != 0 && known(c) && known(d[3].d[0]) && d[3].d[0] != c)
    {
        return "residual=1 needs proj_w to map back to the " + std::to_string(c) + " input channels";
    }
    return {};
}

int32_t MhcaPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != 4 || nbOutputs != 1 || inputs[0].nbDims != 4
        || inputs[3].nbDims != 2)
    {
        return 1;
    }
    outputs[0].nbDims = 4;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = inputs[0].d[1];
    outputs[0].d[2] = inputs[0].d[2];
    outputs[0].d[3] = inputs[3].d[0];
    return 0;
}

int32_t MhcaPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    nvk_dtype dt{};
    if (!toNvkDtype(inputDesc[0].type, dt))
    {
        logError(mLayerName + ": unsupported data type");
        return 1;
    }
    Dims const& x = inputDesc[0].dims;
    nvk_status const st = nvk_mhca(inputs[0], inputs[1], inputs[2], inputs[3], outputs[0], dim(x, 0), dim(x, 1),
        dim(x, 2), dim(x, 3), dim(inputDesc[3].dims, 0), field("residual"), dt, static_cast<void*>(stream));
    return checkNvk(st, "nvk_mhca", mLayerName);
}

// ------------------------------------------------------------------ creator
MhcaPluginCreator::MhcaPluginCreator()
{
    mPluginAttributes.clear();
    mPluginAttributes.emplace_back(PluginField("residual", nullptr, PluginFieldType::kINT32, 1));
    finalizeFields();
}

char const* MhcaPluginCreator::getPluginName() const noexcept
{
    return kMHCA_PLUGIN_NAME;
}

IPluginV3* MhcaPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        std::vector<IntField> fields{{"residual", 1}};
        if (!readIntFields(fc, fields, kMHCA_PLUGIN_NAME))
        {
            return nullptr;
        }
        int32_t const residual = fields[0].value;
        if (residual != 0 && residual != 1)
        {
            logError(std::string(kMHCA_PLUGIN_NAME) + ": residual must be 0 or 1, got " + std::to_string(residual));
            return nullptr;
        }
        return new MhcaPlugin(name != nullptr ? name : "", residual);
    }
    catch (...)
    {
        return nullptr;
    }
}

} // namespace plugin
} // namespace nextvit
