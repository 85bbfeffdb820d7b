/*
 * NextViTMLP plugin (see mlpPlugin.h).
 */
#include "mlpPlugin.h"

using namespace nvinfer1;

namespace nextvit
{
namespace plugin
{

int32_t MlpPlugin::expectedNbInputs() const noexcept
{
    return field("has_x2") != 0 ? 6 : 5;
}

int32_t MlpPlugin::weightOffset() const noexcept
{
    return field("has_x2") != 0 ? 2 : 1;
}

std::string MlpPlugin::checkInputs(Dims const* d, int32_t /*nbInputs*/) const
{
    int32_t const o = weightOffset();
    bool const hasX2 = o == 2;
    Dims const& w1 = d[o];
    Dims const& b1 = d[o + 1];
    Dims const& w2 = d[o + 2];
    Dims const& b2 = d[o + 3];
    if (d[0].nbDims != 4 || (hasX2 && d[1].nbDims != 4) || w1.nbDims != 2 || b1.nbDims != 1 || w2.nbDims != 2
        || b2.nbDims != 1)
    {
        return std::string("expected x [B,H,W,C1], ") + (hasX2 ? "x2 [B,H,W,C2], " : "")
            + "fc1_w [hidden,C1+C2], fc1_b [hidden], fc2_w [Cout,hidden], fc2_b [Cout]; got x "
            + dimsToString(d[0]) + ", fc1_w " + dimsToString(w1) + ", fc2_w " + dimsToString(w2);
    }
    if (hasX2)
    {
        for (int32_t i = 0; i < 3; ++i)
        {
            if (known(d[0].d[i]) && known(d[1].d[i]) && d[0].d[i] != d[1].d[i])
            {
                return "x " + dimsToString(d[0]) + " and x2 " + dimsToString(d[1]) + " differ in B, H or W";
            }
        }
    }
    int64_t const cin = hasX2 ? (known(d[0].d[3]) && known(d[1].d[3]) ? d[0].d[3] + d[1].d[3] : -1) : d[0].d[3];
    if (known(cin) && known(w1.d[1]) && w1.d[1] != cin)
    {
        return "fc1_w expects " + std::to_string(w1.d[1]) + " input channels, the input has " + std::to_string(cin);
    }
    if ((known(w1.d[0]) && known(b1.d[0]) && w1.d[0] != b1.d[0]) || (known(w1.d[0]) && known(w2.d[1]) && w1.d[0] != w2.d[1])
        || (known(w2.d[0]) && known(b2.d[0]) && w2.d[0] != b2.d[0]))
    {
        return "inconsistent weights: fc1_w " + dimsToString(w1) + ", fc1_b " + dimsToString(b1) + ", fc2_w "
            + dimsToString(w2) + ", fc2_b " + dimsToString(b2);
    }
    if (field("residual") != 0 && known(cin) && known(w2.d[0]) && w2.d[0] != cin)
    {
        return "residual=1 needs fc2_w to map back to the " + std::to_string(cin) + " input channels";
    }
    return {};
}

bool MlpPlugin::outputShape(DimsExprs const* inputs, DimsExprs& output, IExprBuilder& /*exprBuilder*/) const noexcept
{
    // [B, H, W, Cout], Cout from fc2_w
    return sameSpatialShape(inputs[0], inputs[weightOffset() + 2], output);
}

size_t MlpPlugin::workspaceBytes(Dims const* maxDims, nvk_dtype dt) const noexcept
{
    int32_t const o = weightOffset();
    Dims const& m = maxDims[0];
    int32_t const c2 = o == 2 ? dim(maxDims[1], 3) : 0;
    return nvk_mlp_workspace_size(dim(m, 0), dim(m, 1), dim(m, 2), dim(m, 3), c2, dim(maxDims[o], 0),
        dim(maxDims[o + 2], 0), field("residual"), dt);
}

int32_t MlpPlugin::launch(PluginTensorDesc const* inputDesc, void const* const* inputs, void* output,
    void* workspace, nvk_dtype dt, void* stream) const noexcept
{
    int32_t const o = weightOffset();
    Dims const& x = inputDesc[0].dims;
    void const* x2 = o == 2 ? inputs[1] : nullptr;
    int32_t const c2 = o == 2 ? dim(inputDesc[1].dims, 3) : 0;
    nvk_status const st = nvk_mlp(inputs[0], x2, inputs[o], inputs[o + 1], inputs[o + 2], inputs[o + 3], output,
        workspace, dim(x, 0), dim(x, 1), dim(x, 2), dim(x, 3), c2, dim(inputDesc[o].dims, 0), dim(inputDesc[o + 2].dims, 0),
        field("residual"), dt, stream);
    return checkNvk(st, "nvk_mlp", mLayerName);
}

} // namespace plugin
} // namespace nextvit
