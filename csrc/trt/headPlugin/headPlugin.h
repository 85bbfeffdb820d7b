/*
 * NextViTHead: classifier head, global average pool + Linear (the final BatchNorm folded into
 * the Linear).
 *
 * Inputs : x [B, H, W, C] (NHWC), w [N, C], b [N]
 * Output : logits [B, N]
 * Fields : none
 */
#ifndef NEXTVIT_TRT_HEAD_PLUGIN_H
#define NEXTVIT_TRT_HEAD_PLUGIN_H

#include "common/nextvitPluginCommon.h"

namespace nextvit
{
namespace plugin
{

constexpr char const* kHEAD_PLUGIN_NAME{"NextViTHead"};

class HeadPlugin final : public NextViTPluginBase
{
public:
    explicit HeadPlugin(std::string const& layerName);

    nvinfer1::IPluginV3* clone() noexcept override;
    char const* getPluginName() const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

protected:
    int32_t expectedNbInputs() const noexcept override;
    int32_t outputRank() const noexcept override;
    std::string checkInputs(nvinfer1::Dims const* dims, int32_t nbInputs) const override;
};

class HeadPluginCreator final : public NextViTCreatorBase
{
public:
    HeadPluginCreator();
    char const* getPluginName() const noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
};

} // namespace plugin
} // namespace nextvit

#endif // NEXTVIT_TRT_HEAD_PLUGIN_H
