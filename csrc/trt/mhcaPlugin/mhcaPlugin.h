/*
 * NextViTMHCA: Next-ViT multi-head convolutional attention with folded BatchNorm,
 *   y = [x +] proj(relu(grouped_conv3x3(x, conv_w, groups = C / 32, padding 1) + conv_b))
 *
 * Inputs : x [B, H, W, C] (NHWC, C a multiple of 32), conv_w [C, 32, 3, 3], conv_b [C],
 *          proj_w [Cout, C]
 * Output : [B, H, W, Cout]
 * Fields : residual (int32, 0 or 1; 1 needs Cout == C)
 * Workspace: nvk_mhca_workspace_size() at the profile's largest shape, which covers every smaller
 *          one (few-pixel shapes run split: the [B*H*W, C] hidden activation goes through it).
 */
#ifndef NEXTVIT_TRT_MHCA_PLUGIN_H
#define NEXTVIT_TRT_MHCA_PLUGIN_H

#include "common/nextvitPluginCommon.h"

namespace nextvit
{
namespace plugin
{

constexpr char const* kMHCA_PLUGIN_NAME{"NextViTMHCA"};

class MhcaPlugin final : public NextViTPlugin<MhcaPlugin>
{
public:
    static constexpr char const* kNAME{kMHCA_PLUGIN_NAME};
    //! {name, min, max}
    static constexpr std::array<IntFieldSpec, 1> kFIELDS{{
        {"residual", 0, 1},
    }};

    using NextViTPlugin::NextViTPlugin;

protected:
    int32_t expectedNbInputs() const noexcept override
    {
        return 4;
    }
    std::string checkInputs(nvinfer1::Dims const* dims, int32_t nbInputs) const override;
    bool outputShape(nvinfer1::DimsExprs const* inputs, nvinfer1::DimsExprs& output,
        nvinfer1::IExprBuilder& exprBuilder) const noexcept override;
    int32_t launch(nvinfer1::PluginTensorDesc const* inputDesc, void const* const* inputs, void* output,
        void* workspace, nvk_dtype dt, void* stream) const noexcept override;
    size_t workspaceBytes(nvinfer1::Dims const* maxDims, nvk_dtype dt) const noexcept override;
};

using MhcaPluginCreator = NextViTPluginCreator<MhcaPlugin>;

} // namespace plugin
} // namespace nextvit

#endif // NEXTVIT_TRT_MHCA_PLUGIN_H
