/*
 * nextvit_kernels TensorRT plugins: helpers shared by every plugin folder.
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
 */
#ifndef NEXTVIT_TRT_PLUGIN_COMMON_H
#define NEXTVIT_TRT_PLUGIN_COMMON_H

#include "NvInferRuntime.h"
#include "nextvit_kernels.h"

#include <cstdint>
#include <string>
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
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
void logError(std::string const& msg) noexcept;
void logWarning(std::string const& msg) noexcept;

//! Maps a TensorRT data type to the C library's; false for anything but fp32 / fp16 / bf16.
bool toNvkDtype(nvinfer1::DataType type, nvk_dtype& out) noexcept;

//! Logs and returns non-zero when a C library call failed.
int32_t checkNvk(nvk_status status, char const* what, std::string const& layer) noexcept;

//! An int32 plugin field (attribute) with its current value.
struct IntField
{
    char const* name;
    int32_t value;
};

//! Copies the int fields of fc into fields (by name). Unknown names are ignored with a
//! warning; a known name with a non-integer type or no data is an error (returns false).
bool readIntFields(nvinfer1::PluginFieldCollection const* fc, std::vector<IntField>& fields,
    char const* pluginName) noexcept;

//! Common part of all Next-ViT plugins. Derived classes give the name, the number of inputs,
//! the output shape, input checks and enqueue.
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
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
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

    int32_t field(char const* name) const noexcept;
    bool validateIO(nvinfer1::Dims const* inDims, int32_t nbInputs, int32_t nbOutputs) const noexcept;

    std::string mLayerName;
    std::vector<IntField> mFields;

private:
    std::vector<nvinfer1::PluginField> mSerialized;
    nvinfer1::PluginFieldCollection mFCToSerialize{};
    std::string mMetadata;
};

//! Common part of all creators: version, namespace, the field list.
class NextViTCreatorBase : public nvinfer1::IPluginCreatorV3One
{
public:
    NextViTCreatorBase() = default;
    ~NextViTCreatorBase() override = default;

    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;

protected:
    //! Call once the derived constructor has filled mPluginAttributes.
    void finalizeFields() noexcept;

    std::vector<nvinfer1::PluginField> mPluginAttributes;
    nvinfer1::PluginFieldCollection mFC{};
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

} // namespace plugin
} // namespace nextvit

#endif // NEXTVIT_TRT_PLUGIN_COMMON_H
