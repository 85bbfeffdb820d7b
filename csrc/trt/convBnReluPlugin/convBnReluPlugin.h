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

class ConvBnReluPlugin final : public NextViTPluginBase
{
public:
    ConvBnReluPlugin(std::string const& layerName, int32_t stride);

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

class ConvBnReluPluginCreator final : public NextViTCreatorBase
{
public:
    ConvBnReluPluginCreator();
    char const* getPluginName() const noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
};

} // namespace plugin
} // namespace nextvit

#endif // NEXTVIT_TRT_CONV_BN_RELU_PLUGIN_H
