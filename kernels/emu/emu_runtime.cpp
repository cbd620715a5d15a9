// emu_runtime.cpp: the emulator's scheduler, worker pool, kernel registry and C ABI.
//
// A launch's blocks are handed out to a persistent pool of OS threads (the calling thread works
// too). Each OS thread runs one block at a time; the block's threads are fibers on that OS thread.
// Fibers are created lazily: a fiber runs thread after thread of the block (a plain call each)
// and only when a thread must wait at a barrier does the scheduler take another fiber (from a
// per-OS-thread pool, reused across blocks and launches) to start the next threads. So a kernel
// without barriers costs two context switches per block, and a barrier costs one switch per
// waiting thread.
#include "cuda_emu.h"
#include "emu_fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace emu {

__thread Tls tls;

namespace {

constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kGroupsPerWarp = 4;
constexpr unsigned kMaxSharedBytes = 227u * 1024u;

// ------------------------------------------------------------------ check mode
// emu_set_checks(flags, seed): kCheckShuffle runs the threads of a block in a random order (a new
// permutation at the start and after every barrier, seeded per block), so that a missing barrier
// changes results; kCheckAsync defers cp.async copies to their wait and poisons the destination
// until then; any check fills dynamic shared memory with 0xFF bytes at each block's start; kCheckCollectives makes a shuffle from a lane that supplied no value return a poison
// (all ones) instead of the reader's own value, and checks that ldmatrix addresses lie in the
// launch's dynamic shared memory. Set between launches, read by every block.
constexpr int kCheckShuffle = 1, kCheckAsync = 2, kCheckCollectives = 4;
std::atomic<int> g_checks{0};
std::atomic<unsigned long long> g_check_seed{0};

// The process's default checks: NATIVEPEFT_EMU_CHECKS = all | none | a number (the flags), and
// NATIVEPEFT_EMU_CHECK_SEED (decimal), read when the library loads. ./build.sh test runs the whole suite with "all".
struct DefaultChecks {
    int flags = 0;
    unsigned long long seed = 0;
    DefaultChecks() {
        if (const char* e = std::getenv("NATIVEPEFT_EMU_CHECKS")) {
            const std::string v(e);
            if (v == "all") flags = kCheckShuffle | kCheckAsync | kCheckCollectives;
            else if (v != "none" && !v.empty()) flags = static_cast<int>(std::strtol(e, nullptr, 10)) & 7;
        }
        if (const char* e = std::getenv("NATIVEPEFT_EMU_CHECK_SEED")) seed = std::strtoull(e, nullptr, 10);
        g_checks.store(flags);
        g_check_seed.store(seed);
    }
};
const DefaultChecks g_default_checks;

inline unsigned long long splitmix64(unsigned long long& state) {
    unsigned long long z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// ------------------------------------------------------------------ registry
struct KernelInfo {
    std::string name;
    Thunk thunk;
    std::vector<int> param_sizes;
};

struct Registry {
    std::vector<KernelInfo> kernels;
    std::unordered_map<std::string, int> by_name;
};

Registry& registry() {
    static Registry r;
    return r;
}

// ------------------------------------------------------------------ errors
thread_local std::string last_error;

int fail_with(const std::string& message) {
    last_error = message;
    return 1;
}

// ------------------------------------------------------------------ fibers
enum class FiberState { Idle, Running, Waiting };

struct Fiber {
    FiberContext ctx;
    void* stack = nullptr;
    std::size_t mapped = 0;
    FiberState state = FiberState::Idle;
    int tid = -1;
    uint3 tidx{0, 0, 0};
};

using ExchangeFn = const char* (*)(void* const* lanes);

struct WarpGroup {
    bool active = false;
    int op = 0;
    ExchangeFn fn = nullptr;  // kExchange: computes every lane's result; returns an error or nullptr
    unsigned mask = 0;
    unsigned arrived = 0;
    unsigned long long value[32];
    int b[32];
    int c[32];
};

struct WarpState {
    unsigned existing = 0;  // lanes that exist in this block
    unsigned exited = 0;
    WarpGroup groups[kGroupsPerWarp];
};

struct Launch;

// A deferred cp.async (check mode): the 16 bytes read at issue, written at the covering wait.
struct PendingCopy {
    unsigned char* dst;
    unsigned char data[16];
    int group;  // -1: not committed yet
};

// Per-OS-thread state of the block being run.
struct Block {
    Thunk thunk = nullptr;
    void** args = nullptr;
    int nthreads = 0;
    int next_unstarted = 0;
    int exited = 0;
    // __syncthreads
    int bar_arrived = 0;
    int bar_op = 0;
    int bar_accum = 0;
    int bar_result = 0;
    std::vector<Fiber*> bar_waiters;
    // warps
    int nwarps = 0;
    WarpState warps[kMaxWarps];
    // per thread
    Fiber* thread_fiber[kMaxThreads];
    unsigned long long thread_result[kMaxThreads];
    // ready queue (ring)
    Fiber* ready[kMaxThreads + 1];
    int ready_head = 0, ready_count = 0;
    // outcome
    bool failed = false;
    std::string error;
    // check mode
    int checks = 0;
    unsigned long long rng = 0;
    std::vector<int> order;          // kCheckShuffle: the order in which threads start
    Fiber* scratch[kMaxThreads + 1];
    unsigned char* smem = nullptr;   // the launch's dynamic shared memory
    unsigned smem_bytes = 0;
    std::vector<PendingCopy> pending[kMaxThreads];
    int committed[kMaxThreads];

    // Fisher-Yates with the block's generator.
    template <typename T> void shuffle(T* v, int n) {
        for (int i = n - 1; i > 0; --i) std::swap(v[i], v[static_cast<int>(splitmix64(rng) % (i + 1u))]);
    }

    void push_ready(Fiber* f) {
        ready[(ready_head + ready_count) % (kMaxThreads + 1)] = f;
        ++ready_count;
    }
    Fiber* pop_ready() {
        Fiber* f = ready[ready_head];
        ready_head = (ready_head + 1) % (kMaxThreads + 1);
        --ready_count;
        return f;
    }
};

std::size_t fiber_stack_bytes() {
    static const std::size_t bytes = [] {
        std::size_t kb = 64;
        if (const char* e = std::getenv("NATIVEPEFT_EMU_STACK_KB")) {
            long v = std::strtol(e, nullptr, 10);
            if (v >= 16 && v <= 65536) kb = static_cast<std::size_t>(v);
        }
        return kb * 1024;
    }();
    return bytes;
}

void fiber_entry(void* arg);

struct Worker {
    FiberContext main_ctx;
    std::vector<Fiber*> all;
    std::vector<Fiber*> idle;
    Fiber* current = nullptr;
    unsigned char* smem = nullptr;
    std::size_t smem_capacity = 0;
    Block* block = nullptr;

    Worker() : block(new Block()) { block->bar_waiters.reserve(kMaxThreads); }
    ~Worker() {
        for (Fiber* f : all) {
            munmap(f->stack, f->mapped);
            delete f;
        }
        std::free(smem);
        delete block;
        tls.worker = nullptr;
    }

    Fiber* new_fiber() {
        const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
        const std::size_t size = fiber_stack_bytes();
        const std::size_t mapped = size + page;
        void* mem = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mem == MAP_FAILED) throw std::bad_alloc();
        mprotect(mem, page, PROT_NONE);  // guard page: an overflow faults instead of corrupting memory
        auto* f = new Fiber();
        f->stack = mem;
        f->mapped = mapped;
        all.push_back(f);
        reset_fiber(f);
        return f;
    }

    // Stack tops are staggered by a few cache lines so that the fibers' hot frames do not all map
    // to the same L1 sets (the stacks are page-aligned and equally sized).
    void reset_fiber(Fiber* f) {
        const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
        const std::size_t index = static_cast<std::size_t>(std::find(all.begin(), all.end(), f) - all.begin());
        const std::size_t stagger = (index % 61) * 64;
        fiber_make(f->ctx, static_cast<char*>(f->stack) + page, f->mapped - page - stagger, &fiber_entry, f);
    }

    Fiber* take_idle() {
        if (idle.empty()) return new_fiber();
        Fiber* f = idle.back();
        idle.pop_back();
        return f;
    }

    bool ensure_smem(std::size_t bytes) {
        if (bytes <= smem_capacity) return true;
        std::size_t cap = (bytes + 4095) & ~static_cast<std::size_t>(4095);
        void* p = std::aligned_alloc(64, cap);
        if (!p) return false;
        std::free(smem);
        smem = static_cast<unsigned char*>(p);
        smem_capacity = cap;
        return true;
    }
};

// The Worker lives as long as its OS thread (thread_local destructor); tls.worker caches it.
Worker& worker_slow() {
    static thread_local Worker w;
    tls.worker = &w;
    return w;
}
inline Worker& worker() {
    void* w = tls.worker;
    return w ? *static_cast<Worker*>(w) : worker_slow();
}

std::string thread_name(const Block& b, int tid) {
    (void)b;
    char buf[160];
    std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", tls.block_idx.x, tls.block_idx.y,
                  tls.block_idx.z, tid % tls.block_dim.x, (tid / tls.block_dim.x) % tls.block_dim.y,
                  tid / (tls.block_dim.x * tls.block_dim.y));
    return buf;
}

void set_failed(Block& b, const std::string& message) {
    if (!b.failed) {
        b.failed = true;
        b.error = message;
    }
}

// Switch from fiber `cur` (which is no longer runnable: waiting or idle) to whatever can run next.
void switch_away(Worker& w, Fiber* cur) {
    Block& b = *w.block;
    Fiber* next = nullptr;
    if (!b.failed) {
        if (b.ready_count > 0) next = b.pop_ready();
        else if (b.next_unstarted < b.nthreads) next = w.take_idle();
        else if (b.exited < b.nthreads) {
            set_failed(b, "deadlock: " + std::to_string(b.nthreads - b.exited) +
                              " thread(s) wait at a barrier (__syncthreads or a warp collective) that the other "
                              "threads never reach");
        }
    }
    if (next == cur) {  // check mode: the fiber queued itself among the others and came first
        cur->state = FiberState::Running;
    } else if (next == nullptr) {
        w.current = nullptr;
        fiber_switch(cur->ctx, w.main_ctx);
    } else {
        next->state = next->state == FiberState::Waiting ? FiberState::Running : next->state;
        w.current = next;
        fiber_switch(cur->ctx, next->ctx);
    }
    // Resumed.
    w.current = cur;
    tls.thread_idx = cur->tidx;
}

// Returns an error message (the group is then left incomplete and the block fails) or nullptr.
const char* complete_group(Block& b, int warp, WarpGroup& g, int self_tid) {
    const int base = warp * 32;
    if (g.op == kExchange) {
        if (g.arrived != 0xffffffffu)
            return "a warp-level matrix instruction (mma/ldmatrix) needs all 32 lanes of the warp; some lanes "
                   "exited or do not exist";
        void* lanes[32];
        for (int l = 0; l < 32; ++l) lanes[l] = reinterpret_cast<void*>(static_cast<std::uintptr_t>(g.value[l]));
        if (const char* e = g.fn(lanes)) return e;
    }
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l)
        if (((g.arrived >> l) & 1u) && g.value[l] != 0) ballot |= 1u << l;
    for (int l = 0; l < 32; ++l) {
        if (!((g.arrived >> l) & 1u)) continue;
        unsigned long long r = 0;
        switch (g.op) {
            case kSyncWarp: case kExchange: break;
            case kBallot: r = ballot; break;
            case kAny: r = ballot != 0; break;
            case kAll: r = ballot == g.arrived; break;
            default: {
                // PTX shfl.sync semantics: c = segmask << 8 | clamp.
                const int bval = g.b[l], cval = g.c[l];
                const int segmask = (cval >> 8) & 0x1f;
                const int max_lane = (l & segmask) | (cval & 0x1f & ~segmask);
                const int min_lane = l & segmask;
                int j = l;
                bool pval = false;
                if (g.op == kShflUp) { j = l - bval; pval = j >= min_lane; }
                else if (g.op == kShflDown) { j = l + bval; pval = j <= max_lane; }
                else if (g.op == kShflXor) { j = l ^ bval; pval = j <= max_lane; }
                else { j = min_lane | (bval & 0x1f & ~segmask); pval = j <= max_lane; }
                if (pval && j >= 0 && j <= 31 && !((g.arrived >> j) & 1u) && (b.checks & kCheckCollectives)) {
                    r = ~0ull;  // undefined on the GPU: a poison that shows where it is used
                    break;
                }
                if (!pval || j < 0 || j > 31 || !((g.arrived >> j) & 1u)) j = l;  // inactive source: own value
                r = g.value[j];
                break;
            }
        }
        b.thread_result[base + l] = r;
    }
    Fiber* wake[32];
    int n = 0;
    for (int l = 0; l < 32; ++l)
        if (((g.arrived >> l) & 1u) && base + l != self_tid) wake[n++] = b.thread_fiber[base + l];
    if (b.checks & kCheckShuffle) b.shuffle(wake, n);
    for (int i = 0; i < n; ++i) {
        wake[i]->state = FiberState::Running;
        b.push_ready(wake[i]);
    }
    g.active = false;
    return nullptr;
}

void complete_barrier(Block& b, Fiber* self) {
    b.bar_result = b.bar_accum;
    b.bar_arrived = 0;
    b.bar_accum = 0;
    if (b.checks & kCheckShuffle) b.shuffle(b.bar_waiters.data(), static_cast<int>(b.bar_waiters.size()));
    for (Fiber* f : b.bar_waiters)
        if (f != self) {
            f->state = FiberState::Running;
            b.push_ready(f);
        }
    b.bar_waiters.clear();
}

void apply_copies(std::vector<PendingCopy>& v, int below_group) {
    std::size_t kept = 0;
    for (std::size_t i = 0; i < v.size(); ++i) {
        if (v[i].group >= 0 && v[i].group < below_group) std::memcpy(v[i].dst, v[i].data, 16);
        else v[kept++] = v[i];
    }
    v.resize(kept);
}

void thread_exited(Block& b, int tid) {
    for (PendingCopy& p : b.pending[tid]) std::memcpy(p.dst, p.data, 16);  // a kernel may exit with copies in flight
    b.pending[tid].clear();
    ++b.exited;
    if (b.bar_arrived > 0 && b.bar_arrived == b.nthreads - b.exited) complete_barrier(b, nullptr);
    WarpState& ws = b.warps[tid / 32];
    ws.exited |= 1u << (tid % 32);
    for (WarpGroup& g : ws.groups) {
        if (!g.active) continue;
        const unsigned expected = g.mask & ws.existing & ~ws.exited;
        if ((g.arrived & expected) == expected)
            if (const char* e = complete_group(b, tid / 32, g, -1)) set_failed(b, thread_name(b, tid) + ": " + e);
    }
}

void fiber_entry(void* arg) {
    Fiber* f = static_cast<Fiber*>(arg);
    Worker& w = worker();  // a fiber never leaves the OS thread that created it
    for (;;) {
        Block& b = *w.block;
        while (!b.failed && b.next_unstarted < b.nthreads) {
            const int t = b.order.empty() ? b.next_unstarted : b.order[b.next_unstarted];
            ++b.next_unstarted;
            f->tid = t;
            f->tidx = uint3{t % tls.block_dim.x, (t / tls.block_dim.x) % tls.block_dim.y,
                            t / (tls.block_dim.x * tls.block_dim.y)};
            f->state = FiberState::Running;
            b.thread_fiber[t] = f;
            tls.thread_idx = f->tidx;
            try {
                b.thunk(b.args);
            } catch (const std::exception& e) {
                set_failed(b, thread_name(b, t) + ": " + e.what());
            } catch (...) {
                set_failed(b, thread_name(b, t) + ": unknown C++ exception");
            }
            if (b.failed) break;
            thread_exited(b, t);
        }
        f->state = FiberState::Idle;
        f->tid = -1;
        w.idle.push_back(f);
        switch_away(w, f);
    }
}

// Runs one block on the calling OS thread. Returns false (and the message) on failure.
bool run_block(Thunk thunk, void** args, dim3 block_dim, unsigned shared_bytes, std::string& error) {
    Worker& w = worker();
    Block& b = *w.block;
    const int n = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
    if (shared_bytes > 0 && !w.ensure_smem(shared_bytes)) {
        error = "cannot allocate " + std::to_string(shared_bytes) + " bytes of dynamic shared memory";
        return false;
    }
    tls.dynamic_smem = shared_bytes > 0 ? w.smem : nullptr;
    b.thunk = thunk;
    b.args = args;
    b.nthreads = n;
    b.next_unstarted = 0;
    b.checks = g_checks.load(std::memory_order_relaxed);
    b.smem = tls.dynamic_smem;
    b.smem_bytes = shared_bytes;
    // Shared memory is undefined at a block's start: in check mode it holds 0xFF bytes (NaN), not what the
    // previous block on this worker left (which a read before the write would otherwise see unharmed).
    if (b.checks != 0 && shared_bytes > 0) std::memset(w.smem, 0xFF, shared_bytes);
    b.order.clear();
    if (b.checks & kCheckShuffle) {
        b.rng = g_check_seed.load(std::memory_order_relaxed) ^
                (0x9E3779B97F4A7C15ull * (1ull + tls.block_idx.x + 65536ull * (tls.block_idx.y + 65536ull * tls.block_idx.z)));
        b.order.resize(static_cast<std::size_t>(n));
        for (int i = 0; i < n; ++i) b.order[static_cast<std::size_t>(i)] = i;
        b.shuffle(b.order.data(), n);
    }
    for (int i = 0; i < n; ++i) {
        b.pending[i].clear();
        b.committed[i] = 0;
    }
    b.exited = 0;
    b.bar_arrived = b.bar_accum = b.bar_result = 0;
    b.bar_waiters.clear();
    b.nwarps = (n + 31) / 32;
    for (int i = 0; i < b.nwarps; ++i) {
        WarpState& ws = b.warps[i];
        const int lanes = std::min(32, n - i * 32);
        ws.existing = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
        ws.exited = 0;
        for (WarpGroup& g : ws.groups) g.active = false;
    }
    b.ready_head = b.ready_count = 0;
    b.failed = false;
    b.error.clear();

    Fiber* f;
    try {
        f = w.take_idle();
    } catch (const std::bad_alloc&) {
        error = "cannot allocate a fiber stack";
        return false;
    }
    w.current = f;
    fiber_switch(w.main_ctx, f->ctx);
    w.current = nullptr;

    if (b.failed) {
        // Abandon the fibers still inside the kernel: restart their contexts from scratch.
        for (Fiber* x : w.all) {
            if (x->state != FiberState::Idle) {
                w.reset_fiber(x);
                x->state = FiberState::Idle;
                x->tid = -1;
                w.idle.push_back(x);
            }
        }
        error = b.error;
        return false;
    }
    return true;
}

// ------------------------------------------------------------------ worker pool
struct Launch {
    Thunk thunk;
    void** args;
    dim3 grid, block;
    unsigned shared_bytes;
    unsigned long long total;
    std::atomic<unsigned long long> next{0};
    std::atomic<bool> failed{false};
    std::mutex error_mutex;
    std::string error;
};

void run_blocks(Launch& l) {
    const unsigned long long gx = l.grid.x, gxy = static_cast<unsigned long long>(l.grid.x) * l.grid.y;
    tls.block_dim = l.block;
    tls.grid_dim = l.grid;
    worker();
    for (;;) {
        if (l.failed.load(std::memory_order_relaxed)) return;
        const unsigned long long i = l.next.fetch_add(1, std::memory_order_relaxed);
        if (i >= l.total) return;
        tls.block_idx = uint3{static_cast<unsigned>(i % gx), static_cast<unsigned>((i / gx) % l.grid.y),
                              static_cast<unsigned>(i / gxy)};
        std::string error;
        if (!run_block(l.thunk, l.args, l.block, l.shared_bytes, error)) {
            std::lock_guard<std::mutex> lock(l.error_mutex);
            if (!l.failed.exchange(true)) l.error = error;
            return;
        }
    }
}

class Pool {
public:
    ~Pool() { stop(); }

    void set_threads(int n) {
        std::lock_guard<std::mutex> launch_lock(launch_mutex_);
        stop();
        if (n <= 0) n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
        target_ = n;
    }

    int threads() {
        std::lock_guard<std::mutex> launch_lock(launch_mutex_);
        ensure_started();
        return target_;
    }

    // Runs all blocks; the caller works too. Serialises concurrent launches.
    void run(Launch& l) {
        std::lock_guard<std::mutex> launch_lock(launch_mutex_);
        ensure_started();
        const unsigned long long helpers =
            std::min<unsigned long long>(workers_.size(), l.total > 0 ? l.total - 1 : 0);
        if (helpers > 0) {
            std::lock_guard<std::mutex> lock(mutex_);
            current_ = &l;
            wanted_ = static_cast<int>(helpers);
            busy_ = 0;
            ++generation_;
            cv_.notify_all();
        }
        run_blocks(l);
        if (helpers > 0) {
            std::unique_lock<std::mutex> lock(mutex_);
            done_cv_.wait(lock, [&] { return wanted_ == 0 && busy_ == 0; });
            current_ = nullptr;
        }
    }

private:
    void ensure_started() {
        if (started_) return;
        if (target_ <= 0) target_ = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
        quit_ = false;
        for (int i = 1; i < target_; ++i) workers_.emplace_back([this] { loop(); });
        started_ = true;
    }

    void stop() {
        if (!started_) return;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            quit_ = true;
            cv_.notify_all();
        }
        for (std::thread& t : workers_) t.join();
        workers_.clear();
        started_ = false;
    }

    void loop() {
        unsigned long long seen = 0;
        for (;;) {
            Launch* l;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                cv_.wait(lock, [&] { return quit_ || (generation_ != seen && wanted_ > 0); });
                if (quit_) return;
                seen = generation_;
                --wanted_;
                ++busy_;
                l = current_;
            }
            run_blocks(*l);
            {
                std::lock_guard<std::mutex> lock(mutex_);
                --busy_;
                if (busy_ == 0 && wanted_ == 0) done_cv_.notify_all();
            }
        }
    }

    std::mutex launch_mutex_;
    std::mutex mutex_;
    std::condition_variable cv_, done_cv_;
    std::vector<std::thread> workers_;
    Launch* current_ = nullptr;
    unsigned long long generation_ = 0;
    int wanted_ = 0, busy_ = 0, target_ = 0;
    bool quit_ = false, started_ = false;
};

Pool& pool() {
    static Pool* p = new Pool();  // never destroyed: workers may outlive static destruction order
    return *p;
}

}  // namespace

// ------------------------------------------------------------------ device-side API
int block_barrier(int op, int predicate) {
    Worker& w = worker();
    Block& b = *w.block;
    Fiber* cur = w.current;
    if (b.bar_arrived == 0) b.bar_op = op;
    switch (op) {
        case kBarrierCount: b.bar_accum += predicate != 0; break;
        case kBarrierAnd: b.bar_accum = (b.bar_arrived == 0 ? 1 : b.bar_accum) & (predicate != 0); break;
        case kBarrierOr: b.bar_accum |= predicate != 0; break;
        default: break;
    }
    ++b.bar_arrived;
    if (b.bar_arrived == b.nthreads - b.exited) {
        complete_barrier(b, cur);
        if (b.checks & kCheckShuffle) {
            // Queue this thread too, at a random place among the ones just released.
            b.push_ready(cur);
            const int n = b.ready_count;
            Fiber** tmp = b.scratch;
            for (int i = 0; i < n; ++i) tmp[i] = b.pop_ready();
            b.shuffle(tmp, n);
            for (int i = 0; i < n; ++i) b.push_ready(tmp[i]);
            cur->state = FiberState::Waiting;
            switch_away(w, cur);
        }
        return b.bar_result;
    }
    b.bar_waiters.push_back(cur);
    cur->state = FiberState::Waiting;
    switch_away(w, cur);
    return b.bar_result;
}

namespace {
unsigned long long join_warp_group(int op, unsigned int mask, unsigned long long value, int bv, int cv, ExchangeFn fn);
}

unsigned long long warp_collective(int op, unsigned int mask, unsigned long long value, int bv, int cv) {
    return join_warp_group(op, mask, value, bv, cv, nullptr);
}

namespace {
unsigned long long join_warp_group(int op, unsigned int mask, unsigned long long value, int bv, int cv, ExchangeFn fn) {
    Worker& w = worker();
    Block& b = *w.block;
    Fiber* cur = w.current;
    const int tid = cur->tid, warp = tid / 32, lane = tid % 32;
    WarpState& ws = b.warps[warp];
    if (!((mask >> lane) & 1u)) {
        trap("warp collective called by a lane that is not in its mask");
    }
    WarpGroup* g = nullptr;
    WarpGroup* free_slot = nullptr;
    for (WarpGroup& x : ws.groups) {
        if (x.active && x.mask == mask) { g = &x; break; }
        if (!x.active && !free_slot) free_slot = &x;
    }
    if (!g) {
        if (!free_slot) trap("too many divergent warp collectives in flight (more than 4 distinct masks)");
        g = free_slot;
        g->active = true;
        g->op = op;
        g->fn = fn;
        g->mask = mask;
        g->arrived = 0;
    } else if (g->op != op || g->fn != fn) {
        trap("lanes of a warp reached different warp collectives with the same mask");
    }
    g->arrived |= 1u << lane;
    g->value[lane] = value;
    g->b[lane] = bv;
    g->c[lane] = cv;
    const unsigned expected = mask & ws.existing & ~ws.exited;
    if ((g->arrived & expected) == expected) {
        if (const char* e = complete_group(b, warp, *g, tid)) trap(e);
        return b.thread_result[tid];
    }
    cur->state = FiberState::Waiting;
    switch_away(w, cur);
    return b.thread_result[tid];
}
}  // namespace

// ------------------------------------------------------------------ warp-level matrix instructions
namespace {

inline float bf16_lo(unsigned r) { return bf16_to_float(static_cast<unsigned short>(r & 0xffffu)); }
inline float bf16_hi(unsigned r) { return bf16_to_float(static_cast<unsigned short>(r >> 16)); }

struct MmaLane {
    float* d;
    const unsigned* a;
    const unsigned* b;
    const float* c;
};

// PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type": g = lane / 4, t = lane % 4;
// A: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..), lower column in bits 0-15;
// B: b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g); C/D: c0 c1 (g, 2t / 2t+1), c2 c3 (g+8, 2t / 2t+1).
// Products of bf16 are exact in fp32; the sum is taken in double and rounded once (the hardware's
// order and intermediate rounding are unspecified, so GPU-vs-emulator comparisons use a tolerance).
const char* mma_complete(void* const* lanes) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
        const MmaLane& x = *static_cast<const MmaLane*>(lanes[l]);
        const int g = l >> 2, t = l & 3;
        A[g][2 * t] = bf16_lo(x.a[0]);         A[g][2 * t + 1] = bf16_hi(x.a[0]);
        A[g + 8][2 * t] = bf16_lo(x.a[1]);     A[g + 8][2 * t + 1] = bf16_hi(x.a[1]);
        A[g][2 * t + 8] = bf16_lo(x.a[2]);     A[g][2 * t + 9] = bf16_hi(x.a[2]);
        A[g + 8][2 * t + 8] = bf16_lo(x.a[3]); A[g + 8][2 * t + 9] = bf16_hi(x.a[3]);
        B[2 * t][g] = bf16_lo(x.b[0]);         B[2 * t + 1][g] = bf16_hi(x.b[0]);
        B[2 * t + 8][g] = bf16_lo(x.b[1]);     B[2 * t + 9][g] = bf16_hi(x.b[1]);
        C[g][2 * t] = x.c[0];     C[g][2 * t + 1] = x.c[1];
        C[g + 8][2 * t] = x.c[2]; C[g + 8][2 * t + 1] = x.c[3];
    }
    float D[16][8];
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
            double acc = 0.0;
            for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[i][k]) * static_cast<double>(B[k][j]);
            D[i][j] = static_cast<float>(acc + static_cast<double>(C[i][j]));
        }
    for (int l = 0; l < 32; ++l) {  // after every read: d may alias c
        const MmaLane& x = *static_cast<const MmaLane*>(lanes[l]);
        const int g = l >> 2, t = l & 3;
        x.d[0] = D[g][2 * t];     x.d[1] = D[g][2 * t + 1];
        x.d[2] = D[g + 8][2 * t]; x.d[3] = D[g + 8][2 * t + 1];
    }
    return nullptr;
}

struct LdmatrixLane {
    unsigned* r;
    const unsigned char* addr;
    int num;
    bool trans;
};

// PTX ISA ldmatrix: lanes 8m .. 8m+7 give the row addresses of matrix m (16 bytes each, 16-byte
// aligned); register m of lane 4r + w holds M_m[r][2w] (low half) and M_m[r][2w+1] (high half), or
// with .trans M_m[2w][r] and M_m[2w+1][r]. Lanes at or past 8 * num supply no address.
const char* ldmatrix_complete(void* const* lanes) {
    const LdmatrixLane& first = *static_cast<const LdmatrixLane*>(lanes[0]);
    const int num = first.num;
    const bool trans = first.trans;
    const Block& b = *worker().block;
    unsigned short M[4][8][8];
    for (int l = 0; l < 32; ++l) {
        const LdmatrixLane& x = *static_cast<const LdmatrixLane*>(lanes[l]);
        if (x.num != num || x.trans != trans) return "lanes of a warp reached ldmatrix with different shapes";
        if (l >= 8 * num) continue;
        const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(x.addr);
        if (a % 16 != 0) return "ldmatrix: a row address is not 16-byte aligned";
        if ((b.checks & kCheckCollectives) &&
            (b.smem == nullptr || x.addr < b.smem || x.addr + 16 > b.smem + b.smem_bytes))
            return "ldmatrix: a row address is outside the launch's dynamic shared memory";
        std::memcpy(M[l / 8][l % 8], x.addr, 16);
    }
    for (int l = 0; l < 32; ++l) {
        const LdmatrixLane& x = *static_cast<const LdmatrixLane*>(lanes[l]);
        const int r = l >> 2, w = l & 3;
        for (int m = 0; m < num; ++m) {
            const unsigned lo = trans ? M[m][2 * w][r] : M[m][r][2 * w];
            const unsigned hi = trans ? M[m][2 * w + 1][r] : M[m][r][2 * w + 1];
            x.r[m] = lo | (hi << 16);
        }
    }
    return nullptr;
}

}  // namespace

void mma_m16n8k16_bf16(float* d, const unsigned* a, const unsigned* b, const float* c) {
    MmaLane mine{d, a, b, c};
    join_warp_group(kExchange, 0xffffffffu, reinterpret_cast<std::uintptr_t>(&mine), 0, 0, &mma_complete);
}

void ldmatrix_m8n8(unsigned* r, int num, bool trans, const void* row_addr) {
    LdmatrixLane mine{r, static_cast<const unsigned char*>(row_addr), num, trans};
    join_warp_group(kExchange, 0xffffffffu, reinterpret_cast<std::uintptr_t>(&mine), 0, 0, &ldmatrix_complete);
}

void cp_async_16(void* dst, const void* src, int src_bytes) {
    Worker& w = worker();
    Block& b = *w.block;
    if (reinterpret_cast<std::uintptr_t>(dst) % 16 != 0 || (src_bytes > 0 && reinterpret_cast<std::uintptr_t>(src) % 16 != 0))
        trap("cp.async: a 16-byte copy needs 16-byte aligned addresses");
    if (src_bytes < 0 || src_bytes > 16) trap("cp.async: src-size must be 0..16");
    unsigned char data[16] = {};
    if (src_bytes > 0) std::memcpy(data, src, static_cast<std::size_t>(src_bytes));
    if (b.checks & kCheckAsync) {
        PendingCopy p;
        p.dst = static_cast<unsigned char*>(dst);
        std::memcpy(p.data, data, 16);
        p.group = -1;
        b.pending[w.current->tid].push_back(p);
        std::memset(dst, 0xFF, 16);
    } else {
        std::memcpy(dst, data, 16);
    }
}

void cp_async_commit() {
    Worker& w = worker();
    Block& b = *w.block;
    const int tid = w.current->tid;
    for (PendingCopy& p : b.pending[tid])
        if (p.group < 0) p.group = b.committed[tid];
    ++b.committed[tid];
}

void cp_async_wait(int pending_groups) {
    Worker& w = worker();
    Block& b = *w.block;
    const int tid = w.current->tid;
    if (!b.pending[tid].empty()) apply_copies(b.pending[tid], b.committed[tid] - pending_groups);
}

unsigned int active_mask() {
    Worker& w = worker();
    const int tid = w.current->tid;
    const WarpState& ws = w.block->warps[tid / 32];
    return ws.existing & ~ws.exited;
}

struct TrapError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

void trap(const char* what) { throw TrapError(what); }

void register_kernel(const char* name, Thunk thunk, int param_count, const int* param_sizes) {
    Registry& r = registry();
    if (r.by_name.count(name)) {
        std::fprintf(stderr, "nativepeft emulator: kernel %s registered twice\n", name);
        return;
    }
    r.by_name.emplace(name, static_cast<int>(r.kernels.size()));
    r.kernels.push_back(KernelInfo{name, thunk, std::vector<int>(param_sizes, param_sizes + param_count)});
}

}  // namespace emu

// ------------------------------------------------------------------ C ABI
using namespace emu;

EMU_EXPORT int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                          unsigned bz, unsigned sharedBytes, void** args) {
    if (name == nullptr) return fail_with("kernel name is null");
    Registry& r = registry();
    auto it = r.by_name.find(name);
    if (it == r.by_name.end()) return fail_with(std::string("unknown kernel '") + name + "'");
    const KernelInfo& k = r.kernels[it->second];
    char buf[256];
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0) {
        std::snprintf(buf, sizeof buf, "%s: zero launch dimension: grid (%u,%u,%u) block (%u,%u,%u)", name, gx, gy,
                      gz, bx, by, bz);
        return fail_with(buf);
    }
    const unsigned long long threads = static_cast<unsigned long long>(bx) * by * bz;
    if (threads > 1024 || bx > 1024 || by > 1024 || bz > 64) {
        std::snprintf(buf, sizeof buf, "%s: invalid block (%u,%u,%u): at most 1024 threads (x,y <= 1024, z <= 64)",
                      name, bx, by, bz);
        return fail_with(buf);
    }
    if (gx > 2147483647u || gy > 65535u || gz > 65535u) {
        std::snprintf(buf, sizeof buf, "%s: invalid grid (%u,%u,%u)", name, gx, gy, gz);
        return fail_with(buf);
    }
    if (sharedBytes > kMaxSharedBytes) {
        std::snprintf(buf, sizeof buf, "%s: %u bytes of dynamic shared memory (at most %u)", name, sharedBytes,
                      kMaxSharedBytes);
        return fail_with(buf);
    }
    if (!k.param_sizes.empty() && args == nullptr) return fail_with(std::string(name) + ": args is null");

    Launch l;
    l.thunk = k.thunk;
    l.args = args;
    l.grid = dim3(gx, gy, gz);
    l.block = dim3(bx, by, bz);
    l.shared_bytes = sharedBytes;
    l.total = static_cast<unsigned long long>(gx) * gy * gz;
    try {
        pool().run(l);
    } catch (const std::exception& e) {
        return fail_with(std::string(name) + ": " + e.what());
    }
    if (l.failed.load()) return fail_with(std::string(name) + ": " + l.error);
    return 0;
}

EMU_EXPORT const char* emu_last_error(void) { return last_error.c_str(); }

EMU_EXPORT int emu_kernel_count(void) { return static_cast<int>(registry().kernels.size()); }

EMU_EXPORT const char* emu_kernel_name(int i) {
    Registry& r = registry();
    if (i < 0 || i >= static_cast<int>(r.kernels.size())) return nullptr;
    return r.kernels[i].name.c_str();
}

// Number of parameters of a kernel (-1 if unknown); writes up to max_sizes parameter sizes in bytes.
EMU_EXPORT int emu_kernel_params(const char* name, int* sizes, int max_sizes) {
    Registry& r = registry();
    auto it = name ? r.by_name.find(name) : r.by_name.end();
    if (it == r.by_name.end()) return -1;
    const KernelInfo& k = r.kernels[it->second];
    for (int i = 0; i < max_sizes && i < static_cast<int>(k.param_sizes.size()); ++i) sizes[i] = k.param_sizes[i];
    return static_cast<int>(k.param_sizes.size());
}

EMU_EXPORT void emu_set_worker_threads(int n) { pool().set_threads(n); }

// Check mode for the launches that follow (see kCheckShuffle, kCheckAsync, kCheckCollectives): flags 0 is
// the normal, fastest mode. The seed picks the thread orders of kCheckShuffle.
EMU_EXPORT void emu_set_checks(int flags, unsigned long long seed) {
    g_check_seed.store(seed);
    g_checks.store(flags & (kCheckShuffle | kCheckAsync | kCheckCollectives));
}

EMU_EXPORT int emu_checks(void) { return g_checks.load(); }

// The checks NATIVEPEFT_EMU_CHECKS asked for when the library loaded (what a test restores after changing them).
EMU_EXPORT int emu_default_checks(void) { return g_default_checks.flags; }

EMU_EXPORT int emu_worker_threads(void) { return pool().threads(); }
