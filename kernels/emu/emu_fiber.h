// emu_fiber.h: minimal stackful fibers for the emulator runtime (internal; not for kernels).
//
// x86-64 (System V): a hand-written context switch (callee-saved registers, MXCSR and the x87
// control word; no signal mask syscall). Elsewhere, or with -DEMU_USE_UCONTEXT: ucontext.
// Windows: TODO (the Win32 Fibers API, CreateFiber/SwitchToFiber, maps 1:1 onto this interface);
// only Linux builds today.
#pragma once

#include <cstddef>

#if defined(_WIN32)
#error "emulator fibers: Windows not implemented yet (TODO: CreateFiber/SwitchToFiber)"
#endif

#if !defined(EMU_USE_UCONTEXT) && !(defined(__x86_64__) && defined(__linux__))
#define EMU_USE_UCONTEXT 1
#endif

#if defined(EMU_USE_UCONTEXT)
#include <ucontext.h>
#endif

namespace emu {

struct FiberContext {
#if defined(EMU_USE_UCONTEXT)
    ucontext_t uc;
#else
    void* sp = nullptr;
#endif
};

// Prepares ctx so that the first switch into it calls entry(arg) on the given stack.
// entry must never return.
__attribute__((visibility("hidden"))) void fiber_make(FiberContext& ctx, void* stack_base, std::size_t stack_size, void (*entry)(void*), void* arg);
// Saves the current context into from and resumes to.
__attribute__((visibility("hidden"))) void fiber_switch(FiberContext& from, FiberContext& to);

}  // namespace emu
