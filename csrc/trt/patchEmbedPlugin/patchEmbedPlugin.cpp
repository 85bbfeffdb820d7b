/*
 * NextViTPatchEmbed plugin and creator (see patchEmbedPlugin.h).
 */
#include "patchEmbedPlugin.h"

using namespace nvinfer1;

namespace nextvit
{
namespace plugin
{

PatchEmbedPlugin::PatchEmbedPlugin(std::string const& layerName, int32_t stride)
    : NextViTPluginBase(layerName, {{"stride", stride}})
{
}

IPluginV3* PatchEmbedPlugin::clone() noexcept
{
    try
    {
        return new PatchEmbedPlugin(*this);
    }
    catch (...)
    {
        return nullptr;
    }
}

char const* PatchEmbedPlugin::getPluginName() const noexcept
{
    return kPATCH_EMBED_PLUGIN_NAME;
}

int32_t PatchEmbedPlugin::expectedNbInputs() const noexcept
{
    return 3;
}

std::string PatchEmbedPlugin::checkInputs(Dims const* d, int32_t /*nbInputs*/) const
{
    if (d[0].nbDims != 4 || d[1].nbDims != 2 || d[2].nbDims != 1)
    {
        return "expected x [B,H,W,Cin], w [Cout,Cin], b [Cout]; got " + dimsToString(d[0]) + ", "
            + dimsToString(d[1]) + ", " + dimsToString(d[2]);
    }
    if (known(d[0].d[3]) && known(d[1].d[1]) && d[0].d[3] != d[1].d[1])
    {
        return "x has " + std::to_string(d[0].d[3]) + " channels but w expects " + std::to_string(d[1].d[1]);
    }
    if (known(d[1].d[0]) && known(d[2].d[0]) && d[1].d[0] != d[2].d[0])
    {
        return "b has " + std::to_string(d[2].d[0]) + " entries, expected Cout = " + std::to_string(d[1].d[0]);
    }
    return {};
}

int32_t PatchEmbedPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != 3 || nbOutputs != 1 || inputs[0].nbDims != 4
        || inputs[1].nbDims != 2)
    {
        return 1;
    }
    // 2x2 / stride 2 average pool with ceil_mode: ceil(n / 2); stride 1: n.
    IDimensionExpr const* s = exprBuilder.constant(field("stride"));
    outputs[0].nbDims = 4;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = exprBuilder.operation(DimensionOperation::kCEIL_DIV, *inputs[0].d[1], *s);
    outputs[0].d[2] = exprBuilder.operation(DimensionOperation::kCEIL_DIV, *inputs[0].d[2], *s);
    outputs[0].d[3] = inputs[1].d[0];
    return 0;
}

int32_t PatchEmbedPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    nvk_dtype dt{};
    if (!toNvkDtype(inputDesc[0].type, dt))
    {
        logError(mLayerName + ": unsupported data type");
        return 1;
    }
    Dims const& x = inputDesc[0].dims;
    nvk_status const st = nvk_patch_embed(inputs[0], inputs[1], inputs[2], outputs[0], dim(x, 0), dim(x, 1),
        dim(x, 2), dim(x, 3), dim(inputDesc[1].dims, 0), field("stride"), dt, static_cast<void*>(stream));
    return checkNvk(st, "nvk_patch_embed", mLayerName);
}

// ------------------------------------------------------------------ creator
PatchEmbedPluginCreator::PatchEmbedPluginCreator()
{
    mPluginAttributes.clear();
    mPluginAttributes.emplace_back(PluginField("stride", nullptr, PluginFieldType::kINT32, 1));
    finalizeFields();
}

char const* PatchEmbedPluginCreator::getPluginName() const noexcept
{
    return kPATCH_EMBED_PLUGIN_NAME;
}

IPluginV3* PatchEmbedPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        std::vector<IntField> fields{{"stride", 1}};
        if (!readIntFields(fc, fields, kPATCH_EMBED_PLUGIN_NAME))
        {
            return nullptr;
        }
        int32_t const stride = fields[0].value;
        if (stride != 1 && stride != 2)
        {
            logError(std::string(kPATCH_EMBED_PLUGIN_NAME) + ": stride must be 1 or 2, got " + std::to_string(stride));
            return nullptr;
        }
        return new PatchEmbedPlugin(name != nullptr ? name : "", stride);
    }
    catch (...)
    {
        return nullptr;
    }
}

} // namespace plugin
} // namespace nextvit
