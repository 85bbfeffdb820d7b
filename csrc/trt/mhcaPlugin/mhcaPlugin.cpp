/*
 * NextViTMHCA plugin (see mhcaPlugin.h).
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

bool MhcaPlugin::outputShape(DimsExprs const* inputs, DimsExprs& output, IExprBuilder& /*exprBuilder*/) const noexcept
{
    // [B, H, W, Cout], Cout from proj_w
    return sameSpatialShape(inputs[0], inputs[3], output);
}

size_t MhcaPlugin::workspaceBytes(Dims const* maxDims, nvk_dtype dt) const noexcept
{
    // nvk_mhca_workspace_size covers every shape with fewer pixels than the upper bound.
    Dims const& m = maxDims[0];
    return nvk_mhca_workspace_size(dim(m, 0), dim(m, 1), dim(m, 2), dim(m, 3), dim(maxDims[3], 0),
        field("residual"), dt);
}

int32_t MhcaPlugin::launch(PluginTensorDesc const* inputDesc, void const* const* inputs, void* output,
    void* workspace, nvk_dtype dt, void* stream) const noexcept
{
    Dims const& x = inputDesc[0].dims;
    nvk_status const st = nvk_mhca(inputs[0], inputs[1], inputs[2], inputs[3], output, workspace, dim(x, 0), dim(x, 1),
        dim(x, 2), dim(x, 3), dim(inputDesc[3].dims, 0), field("residual"), dt, stream);
    return checkNvk(st, "nvk_mhca", mLayerName);
}

} // namespace plugin
} // namespace nextvit
