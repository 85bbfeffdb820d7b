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

class HeadPlugin final : public NextViTPlugin<HeadPlugin>
{
public:
    static constexpr char const* kNAME{kHEAD_PLUGIN_NAME};
    static constexpr std::array<IntFieldSpec, 0> kFIELDS{}; // no fields

    using NextViTPlugin::NextViTPlugin;

protected:
    int32_t expectedNbInputs() const noexcept override
    {
        return 3;
    }
    int32_t outputRank() const noexcept override
    {
        return 2; // logits [B, N]
    }
    std::string checkInputs(nvinfer1::Dims const* dims, int32_t nbInputs) const override;
    bool outputShape(nvinfer1::DimsExprs const* inputs, nvinfer1::DimsExprs& output,
        nvinfer1::IExprBuilder& exprBuilder) const noexcept override;
    int32_t launch(nvinfer1::PluginTensorDesc const* inputDesc, void const* const* inputs, void* output,
        void* workspace, nvk_dtype dt, void* stream) const noexcept override;
};

using HeadPluginCreator = NextViTPluginCreator<HeadPlugin>;

} // namespace plugin
} // namespace nextvit

#endif // NEXTVIT_TRT_HEAD_PLUGIN_H
