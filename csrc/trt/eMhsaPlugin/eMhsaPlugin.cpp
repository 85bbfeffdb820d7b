/*
 * NextViTEMHSA plugin (see eMhsaPlugin.h).
 */
#include "eMhsaPlugin.h"

using namespace nvinfer1;

namespace nextvit
{
namespace plugin
{

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

bool EMhsaPlugin::outputShape(DimsExprs const* inputs, DimsExprs& output, IExprBuilder& /*exprBuilder*/) const noexcept
{
    // [B, H, W, Cout], Cout from proj_w
    return sameSpatialShape(inputs[0], inputs[7], output);
}

size_t EMhsaPlugin::workspaceBytes(Dims const* maxDims, nvk_dtype dt) const noexcept
{
    Dims const& m = maxDims[0];
    return nvk_e_mhsa_workspace_size(dim(m, 0), dim(m, 1), dim(m, 2), dim(m, 3), dim(maxDims[7], 0),
        field("sr_ratio"), field("head_dim"), field("residual"), dt);
}

int32_t EMhsaPlugin::launch(PluginTensorDesc const* inputDesc, void const* const* inputs, void* output,
    void* workspace, nvk_dtype dt, void* stream) const noexcept
{
    Dims const& x = inputDesc[0].dims;
    nvk_status const st = nvk_e_mhsa(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[5], inputs[6],
        inputs[7], inputs[8], output, workspace, dim(x, 0), dim(x, 1), dim(x, 2), dim(x, 3), dim(inputDesc[7].dims, 0),
        field("sr_ratio"), field("head_dim"), field("residual"), dt, stream);
    return checkNvk(st, "nvk_e_mhsa", mLayerName);
}

} // namespace plugin
} // namespace nextvit
