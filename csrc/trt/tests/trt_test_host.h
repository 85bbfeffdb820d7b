/*
 * The host side both CPU harnesses of the plugin library share: what TensorRT hands a plugin
 * library and does with it while building and running an engine, minus TensorRT.
 *
 *   contract_harness.cpp   the plugins linked to a recording stub of the C library: exact C
 *                          arguments, fields, logging, no heap allocation in enqueue
 *   numeric_harness.cpp    the plugins linked to the real C library, called from Python (ctypes)
 *                          under the CPU stand-in of the CUDA driver: outputs, shapes, workspace
 *
 * Here: a recording logger and its ILoggerFinder, a resource context, loading the library as
 * IPluginRegistry::loadLibrary does (dlopen, then setLoggerFinder / getCreators), a
 * PluginFieldCollection with storage, the capability interfaces of a plugin, an IExprBuilder
 * whose expressions evaluate at given B / H / W, and the build-time tensor descriptions
 * (-1 for the dynamic B / H / W, the optimization profile's min / opt / max).
 */
#ifndef NEXTVIT_TRT_TEST_HOST_H
#define NEXTVIT_TRT_TEST_HOST_H

#include "NvInferRuntime.h"

#include <array>
#include <cstdint>
#include <deque>
#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace nvtrt_test
{

// ------------------------------------------------------------------ logger
struct LogEntry
{
    nvinfer1::ILogger::Severity severity;
    std::string msg;
};

class TestLogger : public nvinfer1::ILogger
{
public:
    void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override;
    //! An entry of at least `severity` (kERROR < kWARNING) that contains `text`.
    bool has(Severity severity, std::string const& text) const;
    bool hasError() const;
    //! " | msg | msg ..." of every entry, or " (nothing logged)".
    std::string dump() const;

    std::vector<LogEntry> entries;
};

class TestFinder : public nvinfer1::ILoggerFinder
{
public:
    explicit TestFinder(nvinfer1::ILogger* logger);
    nvinfer1::ILogger* findLogger() override;

private:
    nvinfer1::ILogger* mLogger;
};

//! What TensorRT hands attachToContext; the plugins use neither member.
class TestResourceContext : public nvinfer1::IPluginResourceContext
{
public:
    nvinfer1::IGpuAllocator* getGpuAllocator() const noexcept override;
    nvinfer1::IErrorRecorder* getErrorRecorder() const noexcept override;
};

// ------------------------------------------------------------------ the plugin library
using SetLoggerFinderFn = void (*)(nvinfer1::ILoggerFinder*);
using GetCreatorsFn = nvinfer1::IPluginCreatorInterface* const* (*) (int32_t&);

struct Library
{
    void* handle{nullptr};
    SetLoggerFinderFn setLoggerFinder{nullptr};
    GetCreatorsFn getCreators{nullptr};
};

//! dlopen(RTLD_LOCAL) and the two entry points IPluginRegistry::loadLibrary looks up; calls
//! neither. False, with `error` set, when the library does not load or lacks one.
bool openLibrary(char const* path, Library& lib, std::string& error);

//! The V3One creators by name, as TensorRT sees them (interface kind checked first).
std::map<std::string, nvinfer1::IPluginCreatorV3One*> creators(Library const& lib);

// ------------------------------------------------------------------ fields
//! A PluginFieldCollection with storage for its values.
class FieldSet
{
public:
    FieldSet() = default;
    // the fields point into the deques: a copy would point into the original's
    FieldSet(FieldSet const&) = delete;
    FieldSet& operator=(FieldSet const&) = delete;
    FieldSet(FieldSet&&) = default;
    void i32(char const* name, int32_t v);
    void i64(char const* name, int64_t v);
    void f32(char const* name, float v);
    void add(char const* name, void const* data, nvinfer1::PluginFieldType type, int32_t length);
    nvinfer1::PluginFieldCollection const* fc();

private:
    // deques: growing them keeps the addresses the fields already point to
    std::deque<int32_t> mI32;
    std::deque<int64_t> mI64;
    std::deque<float> mF32;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFC{};
};

// ------------------------------------------------------------------ plugins
struct Caps
{
    nvinfer1::IPluginV3OneCore* core;
    nvinfer1::IPluginV3OneBuild* build;
    nvinfer1::IPluginV3OneRuntime* runtime;
};

Caps caps(nvinfer1::IPluginV3* p);

nvinfer1::Dims mkDims(std::initializer_list<int64_t> v);
std::string str(nvinfer1::Dims const& d);

// ------------------------------------------------------------------ IExprBuilder for getOutputShapes
class Expr : public nvinfer1::IDimensionExpr, public nvinfer1::apiv::VDimensionExpr
{
public:
    explicit Expr(int64_t v);
    explicit Expr(std::string symbol);
    Expr(nvinfer1::DimensionOperation op, Expr const* a, Expr const* b);
    bool isConstant() const override;
    int64_t getConstantValue() const override;
    bool isSizeTensor() const override;
    //! The value with the symbols bound by `env` (every symbol must be in it).
    int64_t eval(std::map<std::string, int64_t> const& env) const;
    static int64_t apply(nvinfer1::DimensionOperation op, int64_t a, int64_t b);

private:
    bool mConstant{false};
    int64_t mValue{0};
    std::string mSymbol;
    nvinfer1::DimensionOperation mOp{nvinfer1::DimensionOperation::kSUM};
    Expr const* mA{nullptr};
    Expr const* mB{nullptr};
};

//! Folds operations on constants like TensorRT's builder; keeps the others symbolic.
class ExprBuilder : public nvinfer1::IExprBuilder, public nvinfer1::apiv::VExprBuilder
{
public:
    ExprBuilder();
    nvinfer1::IDimensionExpr const* constant(int64_t value) override;
    nvinfer1::IDimensionExpr const* operation(nvinfer1::DimensionOperation op, nvinfer1::IDimensionExpr const& first,
        nvinfer1::IDimensionExpr const& second) override;
    nvinfer1::IDimensionExpr const* declareSizeTensor(
        int32_t, nvinfer1::IDimensionExpr const&, nvinfer1::IDimensionExpr const&) override;
    Expr const* symbol(std::string const& name);

private:
    Expr const* keep(Expr* e);
    std::vector<std::unique_ptr<Expr>> mExprs;
};

// ------------------------------------------------------------------ a node's shapes while building
//! The plugin's getOutputShapes for inputs of dims `run` (the first nbActivations inputs are
//! the activations, of dynamic B / H / W), evaluated at `run` and at `max` (the profile's upper
//! bounds: the same dims, B / H / W grown).
struct OutputShape
{
    int32_t status{1};  //!< what getOutputShapes returned
    int32_t nullDim{-1}; //!< the first output dim it left null, else -1
    nvinfer1::Dims atRun{};
    nvinfer1::Dims atMax{};
    std::array<bool, nvinfer1::Dims::MAX_DIMS> constant{}; //!< per output dim: a constant expression
};

//! With `symbolic` the activations' B / H / W are the symbols "B", "H", "W" (as TensorRT hands
//! them for dynamic shapes), else constants.
OutputShape outputShape(nvinfer1::IPluginV3OneBuild& build, std::vector<nvinfer1::Dims> const& run,
    std::vector<nvinfer1::Dims> const& max, int32_t nbActivations, bool symbolic);

//! configurePlugin / getWorkspaceSize's inputs: desc dims -1 for the activations' B / H / W,
//! min = opt = `run`, max = `max`.
std::vector<nvinfer1::DynamicPluginTensorDesc> dynamicInputs(std::vector<nvinfer1::Dims> const& run,
    std::vector<nvinfer1::Dims> const& max, int32_t nbActivations, nvinfer1::DataType type);

//! Their output: -1 where the output dim is not a constant expression, min = opt at `run`.
nvinfer1::DynamicPluginTensorDesc dynamicOutput(OutputShape const& shape, nvinfer1::DataType type);

} // namespace nvtrt_test

#endif // NEXTVIT_TRT_TEST_HOST_H
