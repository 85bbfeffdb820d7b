/*
 * NextViTConvBnRelu: one Next-ViT stem ConvBNReLU (3x3 conv, padding 1, stride 1 or 2, folded
 * BatchNorm as bias, ReLU).
 *
 * Inputs : x [B, H, W, Cin] (NHWC), w [Cout, Cin, 3, 3], b [Cout]
 * Output : [B, ceil(H / stride), ceil(W / stride), Cout]
 * Fields : stride (int32, 1 or 2)
 */
#ifndef NEXTVIT_TRT_CONV_BN_RELU_PLUGIN_H
#define NEXTVIT_TRT_CONV_BN_RELU_PLUGIN_H

#include "common/nextvitPluginCommon.h"

namespace nextvit
{
namespace plugin
{

constexpr char const* kCONV_BN_RELU_PLUGIN_NAME{"NextViTConvBnRelu"};

class ConvBnReluPlugin final : public NextViTPlugin<ConvBnReluPlugin>
{
public:
    static constexpr char const* kNAME{kCONV_BN_RELU_PLUGIN_NAME};
    //! {name, min, max}
    static constexpr std::array<IntFieldSpec, 1> kFIELDS{{
        {"stride", 1, 2},
    }};

    using NextViTPlugin::NextViTPlugin;

protected:
    int32_t expectedNbInputs() const noexcept override
    {
        return 3;
    }
    std::string checkInputs(nvinfer1::Dims const* dims, int32_t nbInputs) const override;
    bool outputShape(nvinfer1::DimsExprs const* inputs, nvinfer1::DimsExprs& output,
        nvinfer1::IExprBuilder& exprBuilder) const noexcept override;
    int32_t launch(nvinfer1::PluginTensorDesc const* inputDesc, void const* const* inputs, void* output,
        void* workspace, nvk_dtype dt, void* stream) const noexcept override;
};

using ConvBnReluPluginCreator = NextViTPluginCreator<ConvBnReluPlugin>;

} // namespace plugin
} // namespace nextvit

#endif // NEXTVIT_TRT_CONV_BN_RELU_PLUGIN_H
