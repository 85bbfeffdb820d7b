/*
 * NextViTConvBnRelu plugin (see convBnReluPlugin.h).
 */
#include "convBnReluPlugin.h"

using namespace nvinfer1;

namespace nextvit
{
namespace plugin
{

std::string ConvBnReluPlugin::checkInputs(Dims const* d, int32_t /*nbInputs*/) const
{
    if (d[0].nbDims != 4 || d[1].nbDims != 4 || d[2].nbDims != 1)
    {
        return "expected x [B,H,W,Cin], w [Cout,Cin,3,3], b [Cout]; got " + dimsToString(d[0]) + ", "
            + dimsToString(d[1]) + ", " + dimsToString(d[2]);
    }
    if (known(d[1].d[2]) && known(d[1].d[3]) && (d[1].d[2] != 3 || d[1].d[3] != 3))
    {
        return "w must be [Cout, Cin, 3, 3], got " + dimsToString(d[1]);
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

bool ConvBnReluPlugin::outputShape(DimsExprs const* inputs, DimsExprs& output, IExprBuilder& exprBuilder) const noexcept
{
    // 3x3 conv, padding 1: (n - 1) / stride + 1 == ceil(n / stride)
    return stridedShape(inputs[0], inputs[1], 4, field("stride"), output, exprBuilder);
}

int32_t ConvBnReluPlugin::launch(PluginTensorDesc const* inputDesc, void const* const* inputs, void* output,
    void* /*workspace*/, nvk_dtype dt, void* stream) const noexcept
{
    Dims const& x = inputDesc[0].dims;
    nvk_status const st = nvk_conv_bn_relu(inputs[0], inputs[1], inputs[2], output, dim(x, 0), dim(x, 1), dim(x, 2),
        dim(x, 3), dim(inputDesc[1].dims, 0), field("stride"), dt, stream);
    return checkNvk(st, "nvk_conv_bn_relu", mLayerName);
}

} // namespace plugin
} // namespace nextvit
