// nativepeft_nvtx.cpp: the NVTX ranges of NativePeft (libnativepeft_nvtx), a thin C ABI over NVTX v3.
//
// NVTX v3 is header-only (nvtx3/nvToolsExt.h): the first call looks for a tool through NVTX_INJECTION64_PATH,
// which Nsight Systems and Nsight Compute set in the processes they profile, and loads it; with no tool every
// call returns at once. The .NET side (src/NativePeft/Runtime/Nvtx.cs) calls these three functions, and only when
// a tool is attached (or NATIVEPEFT_NVTX=1), so a run without a profiler pays nothing.
#include <nvtx3/nvToolsExt.h>

#if defined(_WIN32)
#define NP_NVTX_EXPORT extern "C" __declspec(dllexport)
#else
#define NP_NVTX_EXPORT extern "C" __attribute__((visibility("default")))
#endif

// Opens a range named `name` (UTF-8, NUL-terminated) on the calling thread; returns the nesting level from the
// tool, or a negative value when no tool is attached.
NP_NVTX_EXPORT int nativepeft_nvtx_push(const char* name) { return nvtxRangePushA(name); }

// Closes the calling thread's innermost range.
NP_NVTX_EXPORT int nativepeft_nvtx_pop(void) { return nvtxRangePop(); }

// An instantaneous marker.
NP_NVTX_EXPORT void nativepeft_nvtx_mark(const char* name) { nvtxMarkA(name); }
