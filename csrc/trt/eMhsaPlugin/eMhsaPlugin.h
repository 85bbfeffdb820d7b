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
 *          keys / values).
 */
#ifndef NEXTVIT_TRT_E_MHSA_PLUGIN_H
#define NEXTVIT_TRT_E_MHSA_PLUGIN_H

#include "common/nextvitPluginCommon.h"

namespace nextvit
{
namespace plugin
{

constexpr char const* kE_MHSA_PLUGIN_NAME{"NextViTEMHSA"};

class EMhsaPlugin final : public NextViTPluginBase
{
public:
    EMhsaPlugin(std::string const& layerName, int32_t srRatio, int32_t headDim, int32_t residual);

    nvinfer1::IPluginV3* clone() noexcept override;
    char const* getPluginName() const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

protected:
    int32_t expectedNbInputs() const noexcept override;
    std::string checkInputs(nvinfer1::Dims const* dims, int32_t nbInputs) const override;
};

class EMhsaPluginCreator final : public NextViTCreatorBase
{
public:
    EMhsaPluginCreator();
    char const* getPluginName() const noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
};

} // namespace plugin
} // namespace nextvit

#endif // NEXTVIT_TRT_E_MHSA_PLUGIN_H
