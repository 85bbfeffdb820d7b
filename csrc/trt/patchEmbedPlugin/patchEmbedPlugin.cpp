/*
 * NextViTPatchEmbed plugin (see patchEmbedPlugin.h).
 */
#include "patchEmbedPlugin.h"

using namespace nvinfer1;

namespace nextvit
{
namespace plugin
{

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

bool PatchEmbedPlugin::outputShape(DimsExprs const* inputs, DimsExprs& output, IExprBuilder& exprBuilder) const noexcept
{
    // 2x2 / stride 2 average pool with ceil_mode: ceil(n / 2); stride 1: n.
    return stridedShape(inputs[0], inputs[1], 2, field("stride"), output, exprBuilder);
}

int32_t PatchEmbedPlugin::launch(PluginTensorDesc const* inputDesc, void const* const* inputs, void* output,
    void* /*workspace*/, nvk_dtype dt, void* stream) const noexcept
{
    Dims const& x = inputDesc[0].dims;
    nvk_status const st = nvk_patch_embed(inputs[0], inputs[1], inputs[2], output, dim(x, 0), dim(x, 1), dim(x, 2),
        dim(x, 3), dim(inputDesc[1].dims, 0), field("stride"), dt, stream);
    return checkNvk(st, "nvk_patch_embed", mLayerName);
}

} // namespace plugin
} // namespace nextvit
