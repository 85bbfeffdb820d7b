/*
 * NextViTEMHSA plugin and creator (see eMhsaPlugin.h).
 */
#include "eMhsaPlugin.h"

using namespace nvinfer1;

namespace nextvit
{
namespace plugin
{

EMhsaPlugin::EMhsaPlugin(std::string const& layerName, int32_t srRatio, int32_t headDim, int32_t residual)
    : NextViTPluginBase(layerName, {{"sr_ratio", srRatio}, {"head_dim", headDim}, {"residual", residual}})
{
}

IPluginV3* EMhsaPlugin::clone() noexcept
{
    try
    {
        return new EMhsaPlugin(*this);
    }
    catch (...)
    {
        return nullptr;
    }
}

char const* EMhsaPlugin::getPluginName() const noexcept
{
    return kE_MHSA_PLUGIN_NAME;
}

int32_t EMhsaPlugin::expectedNbInputs() const noexcept
{
    return 9;
}

std::string EMhsaPlugin::checkInputs(Dims const* d, int32_t /*nbInputs*/) const
{
    if (d[0].nbDims != 4)
    {
        return "x must be [B, H, W, C], got " + dimsToString(d[0]);
    }
    int64_t const c = d[0].d[3];
    int32_t const headDim = field("head_dim");
    if (known(c) && c % headDim != 0)
    {
        return "x has " + std::to_string(c) + " channels, not a multiple of head_dim " + std::to_string(headDim);
    }
    // q/k/v weights [C, C] and biases [C]
    for (int32_t i = 1; i <= 5; i += 2)
    {
        if (d[i].nbDims != 2 || d[i + 1].nbDims != 1)
        {
            return "q/k/v weights must be [C, C] with biases [C], got " + dimsToString(d[i]) + " and "
                + dimsToString(d[i + 1]);
        }
        if (known(c) && ((known(d[i].d[0]) && d[i].d[0] != c) || (known(d[i].d[1]) && d[i].d[1] != c)
                            || (known(d[i + 1].d[0]) && d[i + 1].d[0] != c)))
        {
            return "q/k/v weights must be [" + std::to_string(c) + ", " + std::to_string(c) + "], got "
                + dimsToString(d[i]) + " and bias " + dimsToString(d[i + 1]);
        }
    }
    if (d[7].nbDims != 2 || d[8].nbDims != 1)
    {
        return "proj_w must be [Cout, C] and proj_b [Cout], got " + dimsToString(d[7]) + ", " + dimsToString(d[8]);
    }
    if ((known(c) && known(d[7].d[1]) && d[7].d[1] != c) || (known(d[7].d[0]) && known(d[8].d[0]) && d[7].d[0] != d[8].d[0]))
    {
        return "proj weights do not match: proj_w " + dimsToString(d[7]) + ", proj_b " + dimsToString(d[8]);
    }
    if (field("residual") != 0 && known(c) && known(d[7].d[0]) && d[7].d[0] != c)
    {
        return "residual=1 needs proj_w to map back to the " + std::to_string(c) + " input channels";
    }
    int64_t const sr = field("sr_ratio");
    if (sr > 1 && known(d[0].d[1]) && known(d[0].d[2]) && d[0].d[1] * d[0].d[2] < sr * sr)
    {
        return std::to_string(d[0].d[1] * d[0].d[2]) + " tokens are fewer than one " + std::to_string(sr * sr)
            + "-token pooling window (sr_ratio " + std::to_string(sr) + ")";
    }
    return {};
}

int32_t EMhsaPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != 9 || nbOutputs != 1 || inputs[0].nbDims != 4
        || inputs[7].nbDims != 2)
    {
        return 1;
    }
    outputs[0].nbDims = 4;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = inputs[0].d[1];
    outputs[0].d[2] = inputs[0].d[2];
    outputs[0].d[3] = inputs[7].d[0];
    return 0;
}

size_t EMhsaPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (inputs == nullptr || nbInputs != 9 || inputs[0].max.nbDims != 4)
    {
        return 0;
    }
    nvk_dtype dt{};
    if (!toNvkDtype(inputs[0].desc.type, dt))
    {
        return 0;
    }
    // The workspace must cover every shape of the profile: size it for the upper bounds.
    Dims const& m = inputs[0].max;
    return nvk_e_mhsa_workspace_size(dim(m, 0), dim(m, 1), dim(m, 2), dim(m, 3), field("sr_ratio"), dt);
}

int32_t EMhsaPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    nvk_dtype dt{};
    if (!toNvkDtype(inputDesc[0].type, dt))
    {
        logError(mLayerName + ": unsupported data type");
        return 1;
    }
    Dims const& x = inputDesc[0].dims;
    nvk_status const st = nvk_e_mhsa(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[5], inputs[6],
        inputs[7], inputs[8], outputs[0], workspace, dim(x, 0), dim(x, 1), dim(x, 2), dim(x, 3),
        dim(inputDesc[7].dims, 0), field("sr_ratio"), field("head_dim"), field("residual"), dt,
        static_cast<void*>(stream));
    return checkNvk(st, "nvk_e_mhsa", mLayerName);
}

// ------------------------------------------------------------------ creator
EMhsaPluginCreator::EMhsaPluginCreator()
{
    mPluginAttributes.clear();
    mPluginAttributes.emplace_back(PluginField("sr_ratio", nullptr, PluginFieldType::kINT32, 1));
    mPluginAttributes.emplace_back(PluginField("head_dim", nullptr, PluginFieldType::kINT32, 1));
    mPluginAttributes.emplace_back(PluginField("residual", nullptr, PluginFieldType::kINT32, 1));
    finalizeFields();
}

char const* EMhsaPluginCreator::getPluginName() const noexcept
{
    return kE_MHSA_PLUGIN_NAME;
}

IPluginV3* EMhsaPluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        std::vector<IntField> fields{{"sr_ratio", 1}, {"head_dim", 32}, {"residual", 1}};
        if (!readIntFields(fc, fields, kE_MHSA_PLUGIN_NAME))
        {
            return nullptr;
        }
        int32_t const sr = fields[0].value;
        int32_t const headDim = fields[1].value;
        int32_t const residual = fields[2].value;
        if (sr < 1 || headDim < 1 || (residual != 0 && residual != 1))
        {
            logError(std::string(kE_MHSA_PLUGIN_NAME) + ": need sr_ratio >= 1, head_dim >= 1, residual 0/1; got "
                + std::to_string(sr) + ", " + std::to_string(headDim) + ", " + std::to_string(residual));
            return nullptr;
        }
        return new EMhsaPlugin(name != nullptr ? name : "", sr, headDim, residual);
    }
    catch (...)
    {
        return nullptr;
    }
}

} // namespace plugin
} // namespace nextvit
