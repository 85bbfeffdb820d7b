/*
 * nextvit_kernels TensorRT plugins: what every plugin folder shares.
 *
 * Every Next-ViT plugin is an IPluginV3 with the IPluginV3OneCore / IPluginV3OneBuild /
 * IPluginV3OneRuntime capabilities, has exactly one output, works on logically NHWC 4-D
 * tensors stored as TensorFormat::kLINEAR (weights: kLINEAR in the shapes of
 * nextvit_kernels.fused.Plan), supports fp32 / fp16 / bf16 with every input and the output in
 * the same type, and keeps its attributes as int32 PluginFields (the same names as the ONNX
 * node attributes, see nextvit_kernels/onnx_export.py::PLUGINS). The ops themselves run in
 * the nextvit_kernels C library (csrc/include/nextvit_kernels.h), which only launches
 * kernels on the given stream: enqueue() neither allocates nor synchronizes, so it is
 * CUDA-graph capturable.
 *
 * Because the plugins differ only in their fields, shape rules and C library call, the
 * TensorRT plumbing lives here once:
 *   NextViTPluginBase         all IPluginV3* methods, written in terms of a few hooks
 *                             (input count, input check, output shape, launch);
 *   NextViTPlugin<Derived>    CRTP layer: the name and clone() that need the concrete type;
 *   NextViTPluginCreator<P>   the whole creator, driven by P::kNAME and the field table P::kFIELDS.
 * A plugin folder then holds only its name, field table, shape rules and its nvk_* call.
 */
#ifndef NEXTVIT_TRT_PLUGIN_COMMON_H
#define NEXTVIT_TRT_PLUGIN_COMMON_H

#include "NvInferRuntime.h"
#include "nextvit_kernels.h"

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace nextvit
{
namespace plugin
{

//! Version and namespace of every plugin of this library (ONNX attributes plugin_version /
//! plugin_namespace must carry the same strings).
constexpr char const* kNEXTVIT_PLUGIN_VERSION{"1"};
constexpr char const* kNEXTVIT_PLUGIN_NAMESPACE{"nextvit"};

//! Logging through the logger TensorRT hands to the library (setLoggerFinder), else stderr.
//! A null finder is ignored: it does not take the logger away from the plugins.
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
void logError(std::string const& msg) noexcept;
void logWarning(std::string const& msg) noexcept;

//! Maps a TensorRT data type to the C library's; false for anything but fp32 / fp16 / bf16.
bool toNvkDtype(nvinfer1::DataType type, nvk_dtype& out) noexcept;

//! Logs and returns non-zero when a C library call failed.
int32_t checkNvk(nvk_status status, char const* what, std::string const& layer) noexcept;

//! One row of a plugin's field table. Every field is an int32 PluginField (kINT32, length 1):
//! the ONNX parser hands integer node attributes over as such. Every field is required (the
//! ONNX export writes them all, and a silently defaulted stride would build a wrong engine).
struct IntFieldSpec
{
    char const* name;
    int32_t min; //!< accepted range, inclusive
    int32_t max;
};

//! No upper bound for IntFieldSpec::max.
constexpr int32_t kNO_MAX{std::numeric_limits<int32_t>::max()};

//! An int32 plugin field (attribute) with its current value.
struct IntField
{
    char const* name;
    int32_t value;
};

//! Everything the plugins share. A plugin provides the hooks below (protected) and the
//! IPluginV3OneCore name / IPluginV3 clone() through NextViTPlugin<Derived>.
class NextViTPluginBase : public nvinfer1::IPluginV3,
                          public nvinfer1::IPluginV3OneCore,
                          public nvinfer1::IPluginV3OneBuild,
                          public nvinfer1::IPluginV3OneRuntime
{
public:
    NextViTPluginBase(std::string layerName, std::vector<IntField> fields);
    NextViTPluginBase(NextViTPluginBase const& other);
    NextViTPluginBase& operator=(NextViTPluginBase const&) = delete;
    ~NextViTPluginBase() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;

    // IPluginV3OneCore
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    char const* getMetadataString() noexcept override;
    //! workspaceBytes() at the profile's upper bounds, once the inputs pass checkInputs.
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

protected:
    //! Number of inputs the node must have (activations + weights).
    virtual int32_t expectedNbInputs() const noexcept = 0;
    //! Rank of the output (4 = NHWC activation; the head gives [B, classes]).
    virtual int32_t outputRank() const noexcept;
    //! Checks input ranks and the static relations between activation and weight shapes.
    //! Dimensions may be -1 (not known yet) at build time: skip those. Returns an empty
    //! string when fine, else what is wrong.
    virtual std::string checkInputs(nvinfer1::Dims const* dims, int32_t nbInputs) const = 0;
    //! The output shape as expressions of the inputs'. Called with expectedNbInputs() inputs
    //! and a 4-D x (inputs[0]); returns false when another input has the wrong rank.
    virtual bool outputShape(
        nvinfer1::DimsExprs const* inputs, nvinfer1::DimsExprs& output, nvinfer1::IExprBuilder& exprBuilder) const noexcept
        = 0;
    //! Runs the op through the C library on `stream` once the data type is known to be
    //! supported; returns 0 or the (logged, see checkNvk) non-zero C library status.
    virtual int32_t launch(nvinfer1::PluginTensorDesc const* inputDesc, void const* const* inputs, void* output,
        void* workspace, nvk_dtype dt, void* stream) const noexcept = 0;
    //! Device scratch (bytes) that covers every input shape up to `maxDims` (the profile's upper
    //! bounds, already checked by checkInputs); the ops that need none keep the default 0.
    virtual size_t workspaceBytes(nvinfer1::Dims const* maxDims, nvk_dtype dt) const noexcept;

    int32_t field(char const* name) const noexcept;
    bool validateIO(nvinfer1::Dims const* inDims, int32_t nbInputs, int32_t nbOutputs) const noexcept;

    std::string mLayerName;
    std::vector<IntField> mFields;

private:
    std::vector<nvinfer1::PluginField> mSerialized;
    nvinfer1::PluginFieldCollection mFCToSerialize{};
    std::string mMetadata;
};

//! CRTP layer for the two methods that need the concrete plugin type. Derived gives
//! `static constexpr char const* kNAME` (the TensorRT plugin name).
template <typename Derived>
class NextViTPlugin : public NextViTPluginBase
{
public:
    NextViTPlugin(std::string layerName, std::vector<IntField> fields)
        : NextViTPluginBase(std::move(layerName), std::move(fields))
    {
    }

    char const* getPluginName() const noexcept override
    {
        return Derived::kNAME;
    }

    nvinfer1::IPluginV3* clone() noexcept override
    {
        try
        {
            return new Derived(static_cast<Derived const&>(*this));
        }
        catch (...)
        {
            return nullptr;
        }
    }
};

//! Common part of all creators: version, namespace, the advertised fields and reading /
//! validating fields against the plugin's field table.
class NextViTCreatorBase : public nvinfer1::IPluginCreatorV3One
{
public:
    NextViTCreatorBase(IntFieldSpec const* specs, size_t nbSpecs);
    ~NextViTCreatorBase() override = default;

    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;

protected:
    //! The field values for createPlugin: every field of the table, read from fc by name and
    //! checked against its range (in 64 bits, before narrowing to int32). Logs and returns false
    //! on a missing, malformed or out-of-range field; unknown names are ignored with a warning.
    bool readFields(nvinfer1::PluginFieldCollection const* fc, std::vector<IntField>& values) const noexcept;

private:
    std::vector<IntFieldSpec> mSpecs;
    std::vector<nvinfer1::PluginField> mPluginAttributes;
    nvinfer1::PluginFieldCollection mFC{};
};

//! The creator of Plugin (a NextViTPlugin<Plugin> with kNAME and
//! `static constexpr std::array<IntFieldSpec, N> kFIELDS`).
template <typename Plugin>
class NextViTPluginCreator final : public NextViTCreatorBase
{
public:
    NextViTPluginCreator()
        : NextViTCreatorBase(Plugin::kFIELDS.data(), Plugin::kFIELDS.size())
    {
    }

    char const* getPluginName() const noexcept override
    {
        return Plugin::kNAME;
    }

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept override
    {
        // Build and runtime phase alike: the serialized fields are the node's fields.
        try
        {
            std::vector<IntField> values;
            if (!readFields(fc, values))
            {
                return nullptr;
            }
            return new Plugin(name != nullptr ? name : "", std::move(values));
        }
        catch (...)
        {
            return nullptr;
        }
    }
};

//! Shape helpers.
inline int32_t dim(nvinfer1::Dims const& d, int32_t i) noexcept
{
    return static_cast<int32_t>(d.d[i]);
}
inline bool known(int64_t v) noexcept
{
    return v >= 0;
}
std::string dimsToString(nvinfer1::Dims const& d);

//! Output-shape rules shared by several plugins (for outputShape). x is the 4-D NHWC input, w
//! the weight whose first dimension is Cout; both return false when w is not of rank wRank.
//! [B, H, W, Cout]: pointwise ops (w of rank 2).
bool sameSpatialShape(nvinfer1::DimsExprs const& x, nvinfer1::DimsExprs const& w, nvinfer1::DimsExprs& out) noexcept;
//! [B, ceil(H / stride), ceil(W / stride), Cout]: the downsampling stem / patch embedding.
bool stridedShape(nvinfer1::DimsExprs const& x, nvinfer1::DimsExprs const& w, int32_t wRank, int32_t stride,
    nvinfer1::DimsExprs& out, nvinfer1::IExprBuilder& exprBuilder) noexcept;

} // namespace plugin
} // namespace nextvit

#endif // NEXTVIT_TRT_PLUGIN_COMMON_H
