/*
 * NextViTHead plugin (see headPlugin.h).
 */
#include "headPlugin.h"

using namespace nvinfer1;

namespace nextvit
{
namespace plugin
{

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

bool HeadPlugin::outputShape(DimsExprs const* inputs, DimsExprs& output, IExprBuilder& /*exprBuilder*/) const noexcept
{
    if (inputs[1].nbDims != 2)
    {
        return false;
    }
    output.nbDims = 2;
    output.d[0] = inputs[0].d[0];
    output.d[1] = inputs[1].d[0];
    return true;
}

int32_t HeadPlugin::launch(PluginTensorDesc const* inputDesc, void const* const* inputs, void* output,
    void* /*workspace*/, nvk_dtype dt, void* stream) const noexcept
{
    Dims const& x = inputDesc[0].dims;
    nvk_status const st = nvk_head(inputs[0], inputs[1], inputs[2], output, dim(x, 0), dim(x, 1), dim(x, 2), dim(x, 3),
        dim(inputDesc[1].dims, 0), dt, stream);
    return checkNvk(st, "nvk_head", mLayerName);
}

} // namespace plugin
} // namespace nextvit
