// nvtx_recorder.cpp: a minimal NVTX tool for the tests (not shipped). NVTX v3 loads the library named by
// NVTX_INJECTION64_PATH and calls its InitializeInjectionNvtx2, as it does Nsight Systems' injection library;
// this one replaces RangePushA and RangePop in the core function table with functions that append
// "push <depth> <name>" and "pop <depth>" lines to the file named by NATIVEPEFT_NVTX_TEST_LOG.
// tests/NativePeft.Tests/Runtime/NvtxTests.cs runs the CLI under it and reads the file.
#include <nvtx3/nvToolsExt.h>
#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace {
std::FILE* g_log = nullptr;
std::mutex g_lock;
thread_local int t_depth = 0;

int NVTX_API RecordPush(const char* message)
{
    std::lock_guard<std::mutex> guard(g_lock);
    int level = t_depth++;
    if (g_log) { std::fprintf(g_log, "push %d %s\n", level, message ? message : ""); std::fflush(g_log); }
    return level;
}

int NVTX_API RecordPop(void)
{
    std::lock_guard<std::mutex> guard(g_lock);
    int level = --t_depth;
    if (g_log) { std::fprintf(g_log, "pop %d\n", level); std::fflush(g_log); }
    return level;
}
}  // namespace

extern "C" __attribute__((visibility("default"))) int InitializeInjectionNvtx2(NvtxGetExportTableFunc_t getExportTable)
{
    const char* path = std::getenv("NATIVEPEFT_NVTX_TEST_LOG");
    if (!path) return 0;
    const auto* callbacks = static_cast<const NvtxExportTableCallbacks*>(getExportTable(NVTX_ETID_CALLBACKS));
    if (!callbacks) return 0;
    NvtxFunctionTable table = nullptr;
    unsigned int size = 0;
    if (!callbacks->GetModuleFunctionTable(NVTX_CB_MODULE_CORE, &table, &size) || size <= NVTX_CBID_CORE_RangePop) return 0;
    g_log = std::fopen(path, "w");
    if (!g_log) return 0;
    *table[NVTX_CBID_CORE_RangePushA] = reinterpret_cast<NvtxFunctionPointer>(&RecordPush);
    *table[NVTX_CBID_CORE_RangePop] = reinterpret_cast<NvtxFunctionPointer>(&RecordPop);
    return 1;
}
