/*
 * NextViTMHCA: Next-ViT multi-head convolutional attention with folded BatchNorm,
 *   y = [x +] proj(relu(grouped_conv3x3(x, conv_w, groups = C / 32, padding 1) + conv_b))
 *
 * Inputs : x [B, H, W, C] (NHWC, C a multiple of 32), conv_w [C, 32, 3, 3], conv_b [C],
 *          proj_w [Cout, C]
 * Output : [B, H, W, Cout]
 * Fields : residual (int32, 0 or 1; 1 needs Cout == C)
 */
#ifndef NEXTVIT_TRT_MHCA_PLUGIN_H
#define NEXTVIT_TRT_MHCA_PLUGIN_H

#include "common/nextvitPluginCommon.h"

namespace nextvit
{
namespace plugin
{

constexpr char const* kMHCA_PLUGIN_NAME{"NextViTMHCA"};

class MhcaPlugin final : public NextViTPluginBase
{
public:
    MhcaPlugin(std::string const& layerName, int32_t residual);

    nvinfer1::IPluginV3* clone() noexcept override;
    char const* getPluginName() const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

protected:
    int32_t expectedNbInputs() const noexcept override;
    std::string checkInputs(nvinfer1::Dims const* dims, int32_t nbInputs) const override;
};

class MhcaPluginCreator final : public NextViTCreatorBase
{
public:
    MhcaPluginCreator();
    char const* getPluginName() const noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
};

} // namespace plugin
} // namespace nextvit

#endif // NEXTVIT_TRT_MHCA_PLUGIN_H
