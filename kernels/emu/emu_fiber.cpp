// emu_fiber.cpp: context switching for the emulator's fibers (see emu_fiber.h).
#include "emu_fiber.h"

#include <cstdint>
#include <cstring>

#if !defined(EMU_USE_UCONTEXT)

// void emu_ctx_switch_x64(void** save_sp, void* new_sp)
// Frame left on the suspended stack, low to high: r15, r14, r13, r12, rbx, rbp, ret.
// MXCSR and the x87 control word are not switched: they are per OS thread, every fiber of a thread
// shares them, and kernels do not change rounding modes.
asm(R"(
    .text
    .p2align 4
    .globl emu_ctx_switch_x64
    .hidden emu_ctx_switch_x64
    .type emu_ctx_switch_x64,@function
emu_ctx_switch_x64:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch_x64, .-emu_ctx_switch_x64

    .p2align 4
    .globl emu_ctx_entry_x64
    .hidden emu_ctx_entry_x64
    .type emu_ctx_entry_x64,@function
emu_ctx_entry_x64:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    callq *%r13
    ud2
    .cfi_endproc
    .size emu_ctx_entry_x64, .-emu_ctx_entry_x64
)");

extern "C" void emu_ctx_switch_x64(void** save_sp, void* new_sp);
extern "C" void emu_ctx_entry_x64();

namespace emu {

void fiber_make(FiberContext& ctx, void* stack_base, std::size_t stack_size, void (*entry)(void*), void* arg) {
    auto top = (reinterpret_cast<std::uintptr_t>(stack_base) + stack_size) & ~static_cast<std::uintptr_t>(15);
    // After the 7 frame slots are popped (56 bytes), rsp = top - 16: 16-byte aligned at the call.
    auto* frame = reinterpret_cast<std::uint64_t*>(top - 16 - 56);
    frame[0] = 0;                                          // r15
    frame[1] = 0;                                          // r14
    frame[2] = reinterpret_cast<std::uint64_t>(entry);     // r13
    frame[3] = reinterpret_cast<std::uint64_t>(arg);       // r12
    frame[4] = 0;                                          // rbx
    frame[5] = 0;                                          // rbp
    frame[6] = reinterpret_cast<std::uint64_t>(&emu_ctx_entry_x64);
    ctx.sp = frame;
}

void fiber_switch(FiberContext& from, FiberContext& to) { emu_ctx_switch_x64(&from.sp, to.sp); }

}  // namespace emu

#else  // ucontext fallback

namespace emu {

namespace {
void ucontext_trampoline(unsigned int lo, unsigned int hi, unsigned int elo, unsigned int ehi) {
    auto arg = reinterpret_cast<void*>((static_cast<std::uintptr_t>(hi) << 32) | lo);
    auto entry = reinterpret_cast<void (*)(void*)>((static_cast<std::uintptr_t>(ehi) << 32) | elo);
    entry(arg);
    __builtin_trap();
}
}  // namespace

void fiber_make(FiberContext& ctx, void* stack_base, std::size_t stack_size, void (*entry)(void*), void* arg) {
    getcontext(&ctx.uc);
    ctx.uc.uc_stack.ss_sp = stack_base;
    ctx.uc.uc_stack.ss_size = stack_size;
    ctx.uc.uc_link = nullptr;
    auto a = reinterpret_cast<std::uintptr_t>(arg);
    auto e = reinterpret_cast<std::uintptr_t>(entry);
    makecontext(&ctx.uc, reinterpret_cast<void (*)()>(&ucontext_trampoline), 4,
                static_cast<unsigned int>(a), static_cast<unsigned int>(static_cast<std::uint64_t>(a) >> 32),
                static_cast<unsigned int>(e), static_cast<unsigned int>(static_cast<std::uint64_t>(e) >> 32));
}

void fiber_switch(FiberContext& from, FiberContext& to) { swapcontext(&from.uc, &to.uc); }

}  // namespace emu

#endif
