/*
 * A stand-in for libnvinfer.so.<major> (its file name and SONAME, see CMakeLists.txt) with what
 * the plugin library looks up in it at run time: getPluginRegistry and getInferLibVersion.
 * contract_harness.cpp loads it like a host does (RTLD_GLOBAL as trtexec, which links
 * libnvinfer; RTLD_LOCAL as Triton's TensorRT backend, whose libnvinfer is a dependency of a
 * library it dlopens) or not at all.
 *
 * Its registry keeps what TensorRT's keeps: one creator per (name, version, namespace);
 * registerCreator refuses a duplicate and deregisterCreator one it does not hold, as TensorRT
 * does (NvInferRuntimeCommon.h), and here every such refusal is counted
 * (nvtrt_fake_registry_failures), since TensorRT logs it as an error. The test hooks:
 *   nvtrt_fake_set_version(v)         what getInferLibVersion returns from now on
 *   nvtrt_fake_registry_failures()    refused registerCreator / deregisterCreator calls so far
 */
#include "NvInferRuntime.h"
#include "NvInferVersion.h"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#define NVTRT_FAKE_API extern "C" __attribute__((visibility("default")))

using namespace nvinfer1;

namespace
{
std::atomic<int32_t> gVersion{static_cast<int32_t>(NV_TENSORRT_VERSION)};
std::atomic<int32_t> gFailures{0};

class FakeRegistry : public IPluginRegistry
{
public:
#if NV_TENSORRT_MAJOR < 11
    // TensorRT 10's registry still has the deprecated IPluginCreator (IPluginV2) methods; the
    // plugin library has no such creator, so any call to them is a failure.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override
    {
        ++gFailures;
        return false;
    }
    IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept override
    {
        if (n != nullptr)
        {
            *n = 0;
        }
        return nullptr;
    }
    IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept override
    {
        return nullptr;
    }
    bool deregisterCreator(IPluginCreator const&) noexcept override
    {
        ++gFailures;
        return false;
    }
#pragma GCC diagnostic pop
#endif
    void setErrorRecorder(IErrorRecorder* const) noexcept override {}
    IErrorRecorder* getErrorRecorder() const noexcept override
    {
        return nullptr;
    }
    bool isParentSearchEnabled() const override
    {
        return false;
    }
    void setParentSearchEnabled(bool const) override {}
    // the harness plays loadLibrary itself (its calls into the plugin library are what is tested)
    PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override
    {
        ++gFailures;
        return nullptr;
    }
    void deregisterLibrary(PluginLibraryHandle) noexcept override
    {
        ++gFailures;
    }

    bool registerCreator(IPluginCreatorInterface& creator, AsciiChar const* const ns) noexcept override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        try
        {
            Entry e;
            if (ns == nullptr || !describe(creator, ns, e) || find(e.name, e.version, e.ns) != mEntries.end())
            {
                ++gFailures;
                return false;
            }
            mEntries.push_back(e);
            return true;
        }
        catch (...)
        {
            ++gFailures;
            return false;
        }
    }

    IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (n == nullptr)
        {
            return nullptr;
        }
        *n = 0;
        try
        {
            mList.clear();
            for (auto const& e : mEntries)
            {
                mList.push_back(e.creator);
            }
        }
        catch (...)
        {
            return nullptr;
        }
        *n = static_cast<int32_t>(mList.size());
        return mList.empty() ? nullptr : mList.data();
    }

    IPluginCreatorInterface* getCreator(
        AsciiChar const* const name, AsciiChar const* const version, AsciiChar const* const ns) noexcept override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (name == nullptr || version == nullptr)
        {
            return nullptr;
        }
        auto const it = find(name, version, ns != nullptr ? ns : "");
        return it != mEntries.end() ? it->creator : nullptr;
    }

    bool deregisterCreator(IPluginCreatorInterface const& creator) noexcept override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        for (auto it = mEntries.begin(); it != mEntries.end(); ++it)
        {
            if (it->creator == &creator)
            {
                mEntries.erase(it);
                return true;
            }
        }
        ++gFailures;
        return false;
    }

    IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override
    {
        return nullptr;
    }
    int32_t releasePluginResource(AsciiChar const*) noexcept override
    {
        return 1;
    }
    IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override
    {
        return getAllCreators(n);
    }

private:
    struct Entry
    {
        IPluginCreatorInterface* creator;
        std::string name, version, ns;
    };

    //! Name and version of a V3One creator (the only kind the plugin library has).
    static bool describe(IPluginCreatorInterface& creator, char const* ns, Entry& e)
    {
        if (std::strcmp(creator.getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0)
        {
            return false;
        }
        auto& c = static_cast<IPluginCreatorV3One&>(creator);
        if (c.getPluginName() == nullptr || c.getPluginVersion() == nullptr)
        {
            return false;
        }
        e = Entry{&creator, c.getPluginName(), c.getPluginVersion(), ns};
        return true;
    }

    std::vector<Entry>::const_iterator find(std::string const& name, std::string const& version, std::string const& ns) const
    {
        for (auto it = mEntries.begin(); it != mEntries.end(); ++it)
        {
            if (std::tie(it->name, it->version, it->ns) == std::tie(name, version, ns))
            {
                return it;
            }
        }
        return mEntries.end();
    }

    mutable std::mutex mMutex;
    std::vector<Entry> mEntries;
    mutable std::vector<IPluginCreatorInterface*> mList; //!< what getAllCreators hands out
};
} // namespace

NVTRT_FAKE_API IPluginRegistry* getPluginRegistry() noexcept
{
    static FakeRegistry sRegistry;
    return &sRegistry;
}

NVTRT_FAKE_API int32_t getInferLibVersion() noexcept
{
    return gVersion.load();
}

NVTRT_FAKE_API void nvtrt_fake_set_version(int32_t version) noexcept
{
    gVersion.store(version);
}

NVTRT_FAKE_API int32_t nvtrt_fake_registry_failures() noexcept
{
    return gFailures.load();
}
