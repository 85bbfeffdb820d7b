/*
 * NextViTMLP: Next-ViT Mlp with the pre-norm BatchNorm folded into fc1,
 *   u = x (NCB) or concat(x, x2) over channels (NTB; never materialized),
 *   y = [u +] fc2(relu(fc1(u) + fc1_b)) + fc2_b
 *
 * Inputs : x [B, H, W, C1] (NHWC), [x2 [B, H, W, C2] only when has_x2 = 1],
 *          fc1_w [hidden, C1 + C2], fc1_b [hidden], fc2_w [Cout, hidden], fc2_b [Cout]
 * Output : [B, H, W, Cout]
 * Fields : residual (int32, 0 or 1; 1 needs Cout == C1 + C2), has_x2 (int32, 0 or 1)
 */
#ifndef NEXTVIT_TRT_MLP_PLUGIN_H
#define NEXTVIT_TRT_MLP_PLUGIN_H

#include "common/nextvitPluginCommon.h"

namespace nextvit
{
namespace plugin
{

constexpr char const* kMLP_PLUGIN_NAME{"NextViTMLP"};

class MlpPlugin final : public NextViTPluginBase
{
public:
    MlpPlugin(std::string const& layerName, int32_t residual, int32_t hasX2);

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

private:
    //! Index of fc1_w among the inputs (1 without x2, 2 with it).
    int32_t weightOffset() const noexcept;
};

class MlpPluginCreator final : public NextViTCreatorBase
{
public:
    MlpPluginCreator();
    char const* getPluginName() const noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
};

} // namespace plugin
} // namespace nextvit

#endif // NEXTVIT_TRT_MLP_PLUGIN_H
