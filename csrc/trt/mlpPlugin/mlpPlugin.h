/*
 * NextViTMLP: Next-ViT Mlp with the pre-norm BatchNorm folded into fc1,
 *   u = x (NCB) or concat(x, x2) over channels (NTB; never materialized),
 *   y = [u +] fc2(relu(fc1(u) + fc1_b)) + fc2_b
 *
 * Inputs : x [B, H, W, C1] (NHWC), [x2 [B, H, W, C2] only when has_x2 = 1],
 *          fc1_w [hidden, C1 + C2], fc1_b [hidden], fc2_w [Cout, hidden], fc2_b [Cout]
 * Output : [B, H, W, Cout]
 * Fields : residual (int32, 0 or 1; 1 needs Cout == C1 + C2), has_x2 (int32, 0 or 1)
 * Workspace: nvk_mlp_workspace_size() for the largest shape of the profile (the [B*H*W, hidden]
 *          activation between fc1 and fc2 when Cout > 256; 0 otherwise).
 */
#ifndef NEXTVIT_TRT_MLP_PLUGIN_H
#define NEXTVIT_TRT_MLP_PLUGIN_H

#include "common/nextvitPluginCommon.h"

namespace nextvit
{
namespace plugin
{

constexpr char const* kMLP_PLUGIN_NAME{"NextViTMLP"};

class MlpPlugin final : public NextViTPlugin<MlpPlugin>
{
public:
    static constexpr char const* kNAME{kMLP_PLUGIN_NAME};
    //! {name, min, max}
    static constexpr std::array<IntFieldSpec, 2> kFIELDS{{
        {"residual", 0, 1},
        {"has_x2", 0, 1},
    }};

    using NextViTPlugin::NextViTPlugin;

protected:
    int32_t expectedNbInputs() const noexcept override;
    std::string checkInputs(nvinfer1::Dims const* dims, int32_t nbInputs) const override;
    bool outputShape(nvinfer1::DimsExprs const* inputs, nvinfer1::DimsExprs& output,
        nvinfer1::IExprBuilder& exprBuilder) const noexcept override;
    int32_t launch(nvinfer1::PluginTensorDesc const* inputDesc, void const* const* inputs, void* output,
        void* workspace, nvk_dtype dt, void* stream) const noexcept override;
    size_t workspaceBytes(nvinfer1::Dims const* maxDims, nvk_dtype dt) const noexcept override;

private:
    //! Index of fc1_w among the inputs (1 without x2, 2 with it).
    int32_t weightOffset() const noexcept;
};

using MlpPluginCreator = NextViTPluginCreator<MlpPlugin>;

} // namespace plugin
} // namespace nextvit

#endif // NEXTVIT_TRT_MLP_PLUGIN_H
