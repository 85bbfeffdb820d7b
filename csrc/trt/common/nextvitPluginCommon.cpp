/*
 * nextvit_kernels TensorRT plugins: shared plugin / creator base classes and helpers.
 */
#include "nextvitPluginCommon.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <iostream>
#include <sstream>
#include <utility>

namespace nextvit
{
namespace plugin
{
namespace
{
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

void logMessage(nvinfer1::ILogger::Severity severity, std::string const& msg) noexcept
{
    try
    {
        nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
        nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
        std::string const text = "[nextvit_trt_plugins] " + msg;
        if (logger != nullptr)
        {
            logger->log(severity, text.c_str());
        }
        else
        {
            std::cerr << text << std::endl;
        }
    }
    catch (...)
    {
    }
}

//! The integer value of one PluginField, widened to 64 bits so that the range check sees what
//! was passed (a kINT64 of 2^32 + 2 must not become 2). False for a non-integer type, no data
//! or a length other than 1.
bool fieldValue(nvinfer1::PluginField const& f, int64_t& value) noexcept
{
    if (f.data == nullptr || f.length != 1)
    {
        return false;
    }
    switch (f.type)
    {
    case nvinfer1::PluginFieldType::kINT32: value = *static_cast<int32_t const*>(f.data); return true;
    case nvinfer1::PluginFieldType::kINT64: value = *static_cast<int64_t const*>(f.data); return true;
    case nvinfer1::PluginFieldType::kINT16: value = *static_cast<int16_t const*>(f.data); return true;
    case nvinfer1::PluginFieldType::kINT8: value = *static_cast<int8_t const*>(f.data); return true;
    default: return false;
    }
}

std::string rangeText(IntFieldSpec const& spec)
{
    return spec.max == kNO_MAX ? ">= " + std::to_string(spec.min)
        : spec.max == spec.min + 1 ? std::to_string(spec.min) + " or " + std::to_string(spec.max)
                                   : "in [" + std::to_string(spec.min) + ", " + std::to_string(spec.max) + "]";
}
} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    if (finder != nullptr)
    {
        gLoggerFinder.store(finder);
    }
}

void logError(std::string const& msg) noexcept
{
    logMessage(nvinfer1::ILogger::Severity::kERROR, msg);
}

void logWarning(std::string const& msg) noexcept
{
    logMessage(nvinfer1::ILogger::Severity::kWARNING, msg);
}

bool toNvkDtype(nvinfer1::DataType type, nvk_dtype& out) noexcept
{
    switch (type)
    {
    case nvinfer1::DataType::kFLOAT: out = NVK_F32; return true;
    case nvinfer1::DataType::kHALF: out = NVK_F16; return true;
    case nvinfer1::DataType::kBF16: out = NVK_BF16; return true;
    default: return false;
    }
}

int32_t checkNvk(nvk_status status, char const* what, std::string const& layer) noexcept
{
    if (status == NVK_OK)
    {
        return 0;
    }
    char const* detail = nvk_last_error();
    std::ostringstream os;
    os << layer << ": " << what << " failed with status " << static_cast<int>(status) << ": "
       << (detail != nullptr ? detail : "(no message)");
    logError(os.str());
    return static_cast<int32_t>(status);
}

std::string dimsToString(nvinfer1::Dims const& d)
{
    std::ostringstream os;
    os << "[";
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        os << (i ? ", " : "") << d.d[i];
    }
    os << "]";
    return os.str();
}

bool sameSpatialShape(nvinfer1::DimsExprs const& x, nvinfer1::DimsExprs const& w, nvinfer1::DimsExprs& out) noexcept
{
    if (w.nbDims != 2)
    {
        return false;
    }
    out.nbDims = 4;
    out.d[0] = x.d[0];
    out.d[1] = x.d[1];
    out.d[2] = x.d[2];
    out.d[3] = w.d[0];
    return true;
}

bool stridedShape(nvinfer1::DimsExprs const& x, nvinfer1::DimsExprs const& w, int32_t wRank, int32_t stride,
    nvinfer1::DimsExprs& out, nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    if (w.nbDims != wRank)
    {
        return false;
    }
    nvinfer1::IDimensionExpr const* s = exprBuilder.constant(stride);
    out.nbDims = 4;
    out.d[0] = x.d[0];
    out.d[1] = exprBuilder.operation(nvinfer1::DimensionOperation::kCEIL_DIV, *x.d[1], *s);
    out.d[2] = exprBuilder.operation(nvinfer1::DimensionOperation::kCEIL_DIV, *x.d[2], *s);
    out.d[3] = w.d[0];
    return true;
}

// ------------------------------------------------------------------ NextViTPluginBase
NextViTPluginBase::NextViTPluginBase(std::string layerName, std::vector<IntField> fields)
    : mLayerName(std::move(layerName))
    , mFields(std::move(fields))
{
}

NextViTPluginBase::NextViTPluginBase(NextViTPluginBase const& other)
    : nvinfer1::IPluginV3(other)
    , nvinfer1::IPluginV3OneCore(other)
    , nvinfer1::IPluginV3OneBuild(other)
    , nvinfer1::IPluginV3OneRuntime(other)
    , mLayerName(other.mLayerName)
    , mFields(other.mFields)
{
    // mSerialized / mFCToSerialize / mMetadata point into the object: rebuilt on demand.
}

nvinfer1::IPluginCapability* NextViTPluginBase::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    }
    return nullptr;
}

char const* NextViTPluginBase::getPluginVersion() const noexcept
{
    return kNEXTVIT_PLUGIN_VERSION;
}

char const* NextViTPluginBase::getPluginNamespace() const noexcept
{
    return kNEXTVIT_PLUGIN_NAMESPACE;
}

int32_t NextViTPluginBase::getNbOutputs() const noexcept
{
    return 1;
}

int32_t NextViTPluginBase::outputRank() const noexcept
{
    return 4;
}

int32_t NextViTPluginBase::getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
    nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != 1 || nbInputs != expectedNbInputs())
    {
        logError(mLayerName + ": getOutputDataTypes: expected " + std::to_string(expectedNbInputs())
            + " inputs and 1 output, got " + std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
        return 1;
    }
    nvk_dtype dt{};
    if (!toNvkDtype(inputTypes[0], dt))
    {
        logError(mLayerName + ": input type must be FP32, FP16 or BF16");
        return 1;
    }
    outputTypes[0] = inputTypes[0];
    return 0;
}

bool NextViTPluginBase::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || pos < 0 || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
    // Activations are logically NHWC 4-D tensors stored densely (kLINEAR over the NHWC dims);
    // weights are dense too. One type for every input and the output.
    if (desc.format != nvinfer1::TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == 0)
    {
        nvk_dtype dt{};
        return toNvkDtype(desc.type, dt);
    }
    return desc.type == inOut[0].desc.type;
}

bool NextViTPluginBase::validateIO(nvinfer1::Dims const* inDims, int32_t nbInputs, int32_t nbOutputs) const noexcept
{
    try
    {
        if (nbInputs != expectedNbInputs() || nbOutputs != 1)
        {
            logError(mLayerName + ": expected " + std::to_string(expectedNbInputs()) + " inputs and 1 output, got "
                + std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
            return false;
        }
        std::string const err = checkInputs(inDims, nbInputs);
        if (!err.empty())
        {
            logError(mLayerName + " (" + getPluginName() + "): " + err);
            return false;
        }
        return true;
    }
    catch (...)
    {
        return false;
    }
}

int32_t NextViTPluginBase::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (in == nullptr || out == nullptr)
    {
        return 1;
    }
    std::vector<nvinfer1::Dims> dims;
    try
    {
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            dims.push_back(in[i].desc.dims);
        }
    }
    catch (...)
    {
        return 1;
    }
    return validateIO(dims.data(), nbInputs, nbOutputs) ? 0 : 1;
}

size_t NextViTPluginBase::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    nvk_dtype dt{};
    if (inputs == nullptr || nbInputs != expectedNbInputs() || !toNvkDtype(inputs[0].desc.type, dt))
    {
        return 0;
    }
    try
    {
        std::vector<nvinfer1::Dims> maxDims;
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            maxDims.push_back(inputs[i].max);
        }
        return checkInputs(maxDims.data(), nbInputs).empty() ? workspaceBytes(maxDims.data(), dt) : 0;
    }
    catch (...)
    {
        return 0;
    }
}

size_t NextViTPluginBase::workspaceBytes(nvinfer1::Dims const* /*maxDims*/, nvk_dtype /*dt*/) const noexcept
{
    return 0;
}

int32_t NextViTPluginBase::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != expectedNbInputs() || nbOutputs != 1
        || inputs[0].nbDims != 4)
    {
        return 1;
    }
    return outputShape(inputs, outputs[0], exprBuilder) ? 0 : 1;
}

int32_t NextViTPluginBase::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (in == nullptr || out == nullptr)
    {
        return 1;
    }
    std::vector<nvinfer1::Dims> dims;
    try
    {
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            dims.push_back(in[i].dims);
        }
    }
    catch (...)
    {
        return 1;
    }
    if (!validateIO(dims.data(), nbInputs, nbOutputs))
    {
        return 1;
    }
    if (out[0].dims.nbDims != outputRank())
    {
        logError(mLayerName + ": output rank " + std::to_string(out[0].dims.nbDims) + ", expected "
            + std::to_string(outputRank()));
        return 1;
    }
    return 0;
}

int32_t NextViTPluginBase::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /*outputDesc*/, void const* const* inputs, void* const* outputs, void* workspace,
    cudaStream_t stream) noexcept
{
    nvk_dtype dt{};
    if (!toNvkDtype(inputDesc[0].type, dt))
    {
        logError(mLayerName + ": unsupported data type");
        return 1;
    }
    return launch(inputDesc, inputs, outputs[0], workspace, dt, static_cast<void*>(stream));
}

nvinfer1::IPluginV3* NextViTPluginBase::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    // Load the kernels into the current CUDA context now, outside any graph capture, so that
    // enqueue only launches. A failure here is not final: enqueue loads again and reports it.
    (void) nvk_load(nullptr);
    return clone();
}

nvinfer1::PluginFieldCollection const* NextViTPluginBase::getFieldsToSerialize() noexcept
{
    try
    {
        mSerialized.clear();
        for (auto const& f : mFields)
        {
            mSerialized.emplace_back(f.name, &f.value, nvinfer1::PluginFieldType::kINT32, 1);
        }
        mFCToSerialize.nbFields = static_cast<int32_t>(mSerialized.size());
        mFCToSerialize.fields = mSerialized.empty() ? nullptr : mSerialized.data();
        return &mFCToSerialize;
    }
    catch (...)
    {
        return nullptr;
    }
}

char const* NextViTPluginBase::getMetadataString() noexcept
{
    try
    {
        std::ostringstream os;
        for (size_t i = 0; i < mFields.size(); ++i)
        {
            os << (i ? " " : "") << mFields[i].name << "=" << mFields[i].value;
        }
        mMetadata = os.str();
        return mMetadata.c_str();
    }
    catch (...)
    {
        return nullptr;
    }
}

int32_t NextViTPluginBase::field(char const* name) const noexcept
{
    for (auto const& f : mFields)
    {
        if (std::strcmp(f.name, name) == 0)
        {
            return f.value;
        }
    }
    return 0;
}

// ------------------------------------------------------------------ NextViTCreatorBase
NextViTCreatorBase::NextViTCreatorBase(IntFieldSpec const* specs, size_t nbSpecs)
    : mSpecs(specs, specs + nbSpecs)
{
    // TensorRT (and the ONNX parser) read the advertised fields: every field is one int32.
    for (auto const& spec : mSpecs)
    {
        mPluginAttributes.emplace_back(nvinfer1::PluginField(spec.name, nullptr, nvinfer1::PluginFieldType::kINT32, 1));
    }
    mFC.nbFields = static_cast<int32_t>(mPluginAttributes.size());
    mFC.fields = mPluginAttributes.empty() ? nullptr : mPluginAttributes.data();
}

char const* NextViTCreatorBase::getPluginVersion() const noexcept
{
    return kNEXTVIT_PLUGIN_VERSION;
}

char const* NextViTCreatorBase::getPluginNamespace() const noexcept
{
    return kNEXTVIT_PLUGIN_NAMESPACE;
}

nvinfer1::PluginFieldCollection const* NextViTCreatorBase::getFieldNames() noexcept
{
    return &mFC;
}

bool NextViTCreatorBase::readFields(nvinfer1::PluginFieldCollection const* fc, std::vector<IntField>& values) const
    noexcept
{
    try
    {
        std::string const plugin = getPluginName();
        int32_t const nbFields = fc != nullptr ? fc->nbFields : 0;
        if (nbFields > 0 && fc->fields == nullptr)
        {
            logError(plugin + ": PluginFieldCollection has fields but a null field array");
            return false;
        }
        for (int32_t i = 0; i < nbFields; ++i)
        {
            char const* name = fc->fields[i].name;
            bool const known = name != nullptr
                && std::any_of(mSpecs.begin(), mSpecs.end(), [name](IntFieldSpec const& s) { return std::strcmp(s.name, name) == 0; });
            if (!known)
            {
                logWarning(plugin + ": ignoring unknown field '" + (name != nullptr ? name : "(null)") + "'");
            }
        }
        values.clear();
        for (auto const& spec : mSpecs)
        {
            nvinfer1::PluginField const* f = nullptr;
            for (int32_t i = 0; i < nbFields; ++i)
            {
                if (fc->fields[i].name != nullptr && std::strcmp(fc->fields[i].name, spec.name) == 0)
                {
                    f = &fc->fields[i];
                }
            }
            if (f == nullptr)
            {
                logError(plugin + ": missing field '" + spec.name + "' (int32, " + rangeText(spec) + ")");
                return false;
            }
            int64_t v = 0;
            if (!fieldValue(*f, v))
            {
                logError(plugin + ": field '" + spec.name + "' must be one integer (kINT32, length 1)");
                return false;
            }
            if (v < spec.min || v > spec.max)
            {
                logError(plugin + ": " + spec.name + " must be " + rangeText(spec) + ", got " + std::to_string(v));
                return false;
            }
            values.push_back({spec.name, static_cast<int32_t>(v)});
        }
        return true;
    }
    catch (...)
    {
        return false;
    }
}

} // namespace plugin
} // namespace nextvit
