/*
 * NextViTEMHSA: Next-ViT efficient multi-head self attention with every BatchNorm folded
 * (pre-norm into q/k/v, the pooled-token BatchNorm1d into k/v). Tokens are the H*W rows of
 * the NHWC input in row-major order; with sr_ratio > 1 keys/values come from averages of
 * sr^2 consecutive tokens (1-D pooling over the flattened axis, trailing N mod sr^2 tokens
 * dropped). out = [x +] proj(softmax(q k^T / sqrt(head_dim)) v) + proj_b.
 *
 * Inputs : x [B, H, W, C] (NHWC, C a multiple of head_dim), q_w [C, C], q_b [C], k_w [C, C],
 *          k_b [C], v_w [C, C], v_b [C], proj_w [Cout, C], proj_b [Cout]
 * Output : [B, H, W, Cout]
 * Fields : sr_ratio (int32 >= 1), head_dim (int32 > 0), residual (int32, 0 or 1; 1 needs Cout == C)
 * Workspace: nvk_e_mhsa_workspace_size() for the largest shape of the profile (the pooled
 *          keys / values and, for Cout > 256, the attention output between its two kernels).
 */
#ifndef NEXTVIT_TRT_E_MHSA_PLUGIN_H
#define NEXTVIT_TRT_E_MHSA_PLUGIN_H

#include "common/nextvitPluginCommon.h"

namespace nextvit
{
namespace plugin
{

constexpr char const* kE_MHSA_PLUGIN_NAME{"NextViTEMHSA"};

class EMhsaPlugin final : public NextViTPlugin<EMhsaPlugin>
{
public:
    static constexpr char const* kNAME{kE_MHSA_PLUGIN_NAME};
    //! {name, min, max}
    static constexpr std::array<IntFieldSpec, 3> kFIELDS{{
        {"sr_ratio", 1, kNO_MAX},
        {"head_dim", 1, kNO_MAX},
        {"residual", 0, 1},
    }};

    using NextViTPlugin::NextViTPlugin;

protected:
    int32_t expectedNbInputs() const noexcept override
    {
        return 9;
    }
    std::string checkInputs(nvinfer1::Dims const* dims, int32_t nbInputs) const override;
    bool outputShape(nvinfer1::DimsExprs const* inputs, nvinfer1::DimsExprs& output,
        nvinfer1::IExprBuilder& exprBuilder) const noexcept override;
    int32_t launch(nvinfer1::PluginTensorDesc const* inputDesc, void const* const* inputs, void* output,
        void* workspace, nvk_dtype dt, void* stream) const noexcept override;
    size_t workspaceBytes(nvinfer1::Dims const* maxDims, nvk_dtype dt) const noexcept override;
};

using EMhsaPluginCreator = NextViTPluginCreator<EMhsaPlugin>;

} // namespace plugin
} // namespace nextvit

#endif // NEXTVIT_TRT_E_MHSA_PLUGIN_H
