/* The host side of the plugins' CPU harnesses (see trt_test_host.h). */
#include "trt_test_host.h"

#include <dlfcn.h>

#include <cstring>
#include <limits>
#include <utility>

using namespace nvinfer1;

namespace nvtrt_test
{

// ------------------------------------------------------------------ logger
void TestLogger::log(Severity severity, AsciiChar const* msg) noexcept
{
    try
    {
        entries.push_back({severity, msg != nullptr ? msg : ""});
    }
    catch (...)
    {
    }
}

bool TestLogger::has(Severity severity, std::string const& text) const
{
    for (auto const& e : entries)
    {
        if (e.severity <= severity && e.msg.find(text) != std::string::npos)
        {
            return true;
        }
    }
    return false;
}

bool TestLogger::hasError() const
{
    return has(Severity::kERROR, "");
}

std::string TestLogger::dump() const
{
    std::string s;
    for (auto const& e : entries)
    {
        s += " | " + e.msg;
    }
    return s.empty() ? " (nothing logged)" : s;
}

TestFinder::TestFinder(ILogger* logger)
    : mLogger(logger)
{
}

ILogger* TestFinder::findLogger()
{
    return mLogger;
}

IGpuAllocator* TestResourceContext::getGpuAllocator() const noexcept
{
    return nullptr;
}

IErrorRecorder* TestResourceContext::getErrorRecorder() const noexcept
{
    return nullptr;
}

// ------------------------------------------------------------------ the plugin library
bool openLibrary(char const* path, Library& lib, std::string& error)
{
    lib = Library{};
    if (path == nullptr)
    {
        error = "no plugin library path";
        return false;
    }
    lib.handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib.handle == nullptr)
    {
        char const* why = dlerror();
        error = std::string("dlopen(") + path + ") failed: " + (why != nullptr ? why : "?");
        return false;
    }
    lib.setLoggerFinder = reinterpret_cast<SetLoggerFinderFn>(dlsym(lib.handle, "setLoggerFinder"));
    lib.getCreators = reinterpret_cast<GetCreatorsFn>(dlsym(lib.handle, "getCreators"));
    if (lib.setLoggerFinder == nullptr || lib.getCreators == nullptr)
    {
        error = std::string(path) + " lacks setLoggerFinder / getCreators";
        return false;
    }
    return true;
}

std::map<std::string, IPluginCreatorV3One*> creators(Library const& lib)
{
    std::map<std::string, IPluginCreatorV3One*> out;
    int32_t n = 0;
    IPluginCreatorInterface* const* list = lib.getCreators != nullptr ? lib.getCreators(n) : nullptr;
    for (int32_t i = 0; list != nullptr && i < n; ++i)
    {
        if (list[i] != nullptr && std::strcmp(list[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0)
        {
            auto* c = static_cast<IPluginCreatorV3One*>(list[i]);
            out[c->getPluginName()] = c;
        }
    }
    return out;
}

// ------------------------------------------------------------------ fields
void FieldSet::i32(char const* name, int32_t v)
{
    add(name, &mI32.emplace_back(v), PluginFieldType::kINT32, 1);
}

void FieldSet::i64(char const* name, int64_t v)
{
    add(name, &mI64.emplace_back(v), PluginFieldType::kINT64, 1);
}

void FieldSet::f32(char const* name, float v)
{
    add(name, &mF32.emplace_back(v), PluginFieldType::kFLOAT32, 1);
}

void FieldSet::add(char const* name, void const* data, PluginFieldType type, int32_t length)
{
    mFields.emplace_back(name, data, type, length);
}

PluginFieldCollection const* FieldSet::fc()
{
    mFC.nbFields = static_cast<int32_t>(mFields.size());
    mFC.fields = mFields.data();
    return &mFC;
}

// ------------------------------------------------------------------ plugins
Caps caps(IPluginV3* p)
{
    return {static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE)),
        static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD)),
        static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME))};
}

std::string str(Dims const& d)
{
    std::string s = "[";
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        s += (i ? "," : "") + std::to_string(d.d[i]);
    }
    return s + "]";
}

Dims mkDims(std::initializer_list<int64_t> v)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    int32_t i = 0;
    for (int64_t x : v)
    {
        d.d[i++] = x;
    }
    return d;
}

// ------------------------------------------------------------------ IExprBuilder
Expr::Expr(int64_t v)
    : mConstant(true)
    , mValue(v)
{
    mImpl = this;
}

Expr::Expr(std::string symbol)
    : mSymbol(std::move(symbol))
{
    mImpl = this;
}

Expr::Expr(DimensionOperation op, Expr const* a, Expr const* b)
    : mOp(op)
    , mA(a)
    , mB(b)
{
    mImpl = this;
}

bool Expr::isConstant() const
{
    return mConstant;
}

int64_t Expr::getConstantValue() const
{
    return mConstant ? mValue : std::numeric_limits<int64_t>::min();
}

bool Expr::isSizeTensor() const
{
    return false;
}

int64_t Expr::eval(std::map<std::string, int64_t> const& env) const
{
    if (mConstant)
    {
        return mValue;
    }
    if (mA == nullptr)
    {
        return env.at(mSymbol);
    }
    return apply(mOp, mA->eval(env), mB->eval(env));
}

int64_t Expr::apply(DimensionOperation op, int64_t a, int64_t b)
{
    switch (op)
    {
    case DimensionOperation::kSUM: return a + b;
    case DimensionOperation::kPROD: return a * b;
    case DimensionOperation::kMAX: return a > b ? a : b;
    case DimensionOperation::kMIN: return a < b ? a : b;
    case DimensionOperation::kSUB: return a - b;
    case DimensionOperation::kEQUAL: return a == b;
    case DimensionOperation::kLESS: return a < b;
    case DimensionOperation::kFLOOR_DIV: return a / b - ((a % b != 0) && ((a < 0) != (b < 0)));
    case DimensionOperation::kCEIL_DIV: return -((-a) / b - (((-a) % b != 0) && ((-a < 0) != (b < 0))));
    }
    return std::numeric_limits<int64_t>::min();
}

ExprBuilder::ExprBuilder()
{
    mImpl = this;
}

IDimensionExpr const* ExprBuilder::constant(int64_t value)
{
    return keep(new Expr(value));
}

IDimensionExpr const* ExprBuilder::operation(DimensionOperation op, IDimensionExpr const& first, IDimensionExpr const& second)
{
    auto const& a = static_cast<Expr const&>(first);
    auto const& b = static_cast<Expr const&>(second);
    if (a.isConstant() && b.isConstant())
    {
        return keep(new Expr(Expr::apply(op, a.getConstantValue(), b.getConstantValue())));
    }
    return keep(new Expr(op, &a, &b));
}

IDimensionExpr const* ExprBuilder::declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&)
{
    return nullptr;
}

Expr const* ExprBuilder::symbol(std::string const& name)
{
    return keep(new Expr(name));
}

Expr const* ExprBuilder::keep(Expr* e)
{
    mExprs.emplace_back(e);
    return e;
}

// ------------------------------------------------------------------ a node's shapes while building
namespace
{
bool isDynamic(int32_t input, int32_t dim, int32_t nbActivations)
{
    return input < nbActivations && dim < 3; // B, H, W of an NHWC activation
}

std::map<std::string, int64_t> bhw(Dims const& x)
{
    return {{"B", x.d[0]}, {"H", x.d[1]}, {"W", x.d[2]}};
}
} // namespace

OutputShape outputShape(IPluginV3OneBuild& build, std::vector<Dims> const& run, std::vector<Dims> const& max,
    int32_t nbActivations, bool symbolic)
{
    OutputShape shape;
    int32_t const nIn = static_cast<int32_t>(run.size());
    if (nIn == 0 || max.size() != run.size() || run[0].nbDims < 3 || max[0].nbDims < 3)
    {
        return shape;
    }
    ExprBuilder eb;
    std::vector<DimsExprs> in(nIn);
    for (int32_t i = 0; i < nIn; ++i)
    {
        in[i].nbDims = run[i].nbDims;
        for (int32_t k = 0; k < run[i].nbDims; ++k)
        {
            in[i].d[k] = symbolic && isDynamic(i, k, nbActivations) ? eb.symbol(std::string("BHW").substr(k, 1))
                                                                     : eb.constant(run[i].d[k]);
        }
    }
    DimsExprs out{};
    shape.status = build.getOutputShapes(in.data(), nIn, nullptr, 0, &out, 1, eb);
    if (shape.status != 0 || out.nbDims < 0 || out.nbDims > Dims::MAX_DIMS)
    {
        return shape;
    }
    shape.atRun.nbDims = shape.atMax.nbDims = out.nbDims;
    for (int32_t k = 0; k < out.nbDims; ++k)
    {
        auto const* e = static_cast<Expr const*>(out.d[k]);
        if (e == nullptr)
        {
            shape.nullDim = shape.nullDim < 0 ? k : shape.nullDim;
            continue;
        }
        shape.atRun.d[k] = e->eval(bhw(run[0]));
        // constant dims were built from the run dims: the same at the profile's max
        shape.atMax.d[k] = symbolic ? e->eval(bhw(max[0])) : shape.atRun.d[k];
        shape.constant[k] = e->isConstant();
    }
    return shape;
}

std::vector<DynamicPluginTensorDesc> dynamicInputs(
    std::vector<Dims> const& run, std::vector<Dims> const& max, int32_t nbActivations, DataType type)
{
    std::vector<DynamicPluginTensorDesc> dyn(run.size());
    for (size_t i = 0; i < run.size() && i < max.size(); ++i)
    {
        Dims d = run[i];
        for (int32_t k = 0; k < d.nbDims; ++k)
        {
            d.d[k] = isDynamic(static_cast<int32_t>(i), k, nbActivations) ? -1 : d.d[k];
        }
        dyn[i].desc = PluginTensorDesc{d, type, TensorFormat::kLINEAR, 1.F};
        dyn[i].min = run[i];
        dyn[i].opt = run[i];
        dyn[i].max = max[i];
    }
    return dyn;
}

DynamicPluginTensorDesc dynamicOutput(OutputShape const& shape, DataType type)
{
    DynamicPluginTensorDesc out{};
    Dims d = shape.atRun;
    for (int32_t k = 0; k < d.nbDims; ++k)
    {
        d.d[k] = shape.constant[k] ? d.d[k] : -1;
    }
    out.desc = PluginTensorDesc{d, type, TensorFormat::kLINEAR, 1.F};
    out.min = shape.atRun;
    out.opt = shape.atRun;
    out.max = shape.atMax;
    return out;
}

} // namespace nvtrt_test
