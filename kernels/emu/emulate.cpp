// Host emulation of the CUDA kernels in kernels/clamp.cu, kernels/noise.cu and kernels/stats.cu:
// their unmodified source, compiled by a host C++17 compiler against host_shim.h.
//
// * clamp, noise: a launch runs one (block, thread) at a time. Sequential execution is a valid
//   schedule for these kernels: no thread reads anything another writes, and there is no shared
//   memory, barrier or atomic.
// * stats: blocks run one after another, the threads of a block concurrently as coroutines with
//   barriers, warp shuffles, shared memory and f64 atomics (see "Block scheduler" below).
//
// The Rust tests tests/kernel_emulation.rs and tests/kernel_emulation_stats.rs compare the
// results with the crate's CPU ops.
//
// Build from the repository root ($CUDA is the toolkit root that .ci/cuda-toolkit.sh sets; only
// its include/ is used):
//
//     g++ -std=c++17 -O2 -ffp-contract=off -Wall -Wextra -Werror -I"$CUDA/include"
//         -o target/cuda/kernel-emu kernels/emu/emulate.cpp
//
// Modes (all binary data little-endian, element types as in the kernel's name):
//
//   kernel-emu run kernel=NAME grid=G block=B n=N row_len=R units=U inner=I per_level=P
//                  x_len=X [index=auto|32|64] [order=forward|reverse]
//                  clamp kernels: keep_len=K values_len=V
//                  noise kernels: std_len=S seed=.. level_offset=.. sample_offset=..
//                                 total_samples=..
//       NAME is a kernel of clamp.cu / noise.cu, e.g. level_clamp_expand_f16. The launch is G
//       blocks of B threads (1-D). stdin: the inputs back to back in argument order (clamp: X
//       elements of x, K bytes of keep, V elements of values; noise: X elements of x, S f32 of
//       std). stdout: the N output elements. The output is pre-filled with all-ones bytes, so an
//       element no thread wrote reads back as that pattern. index=auto (default) calls the
//       extern "C" entry point, which picks the index width from N (32-bit below 2^31);
//       index=32 / index=64 call the kernel body template with that index type directly, so
//       the 64-bit path runs on small inputs. order=reverse runs the threads last to first.
//       Every buffer has 1024 guard elements on each side: the input guards hold the all-ones
//       pattern too (a stray read shows in the output), and a write to an output guard fails
//       the run (exit 1).
//   kernel-emu stats dtype=f32|f64|f16|bf16 rows=R units=U inner=I classes=C grid=GX grid_y=GY
//                    [block=256] [shape=auto|dense|maps] [sched=rr|low|high|random] [seed=S]
//       The statistics pass as src/ops/cuda.rs (`unit_sums`) launches it: one zeroed f64 buffer
//       of (2 + C) x U elements; unit_stats_<shape>_<dtype> adds into rows 0 (sum), 1 (sum_sq)
//       and 2.. (class sums), with grid (GX, GY) of 1-D blocks. shape=auto (default) takes the dense kernels when I = 1,
//       as the launcher does; maps needs block a multiple of 32, at most 256. sched is the
//       block scheduler's policy (default rr); seed drives the random one. stdin: R*U*I elements
//       of x, then R u32 labels. stdout: the (2 + C) * U f64. Input guards as for run; the
//       output's guards hold a signalling NaN, and a write there fails the run (exit 1). So does
//       a deadlock (a barrier that not every thread of its block reaches) or a shuffle outside a
//       full warp.
//   kernel-emu fastdiv
//       stdin: pairs of u32 (d, n), d >= 1; stdout: FastDivU32(d).div(n) (u32) per pair.
//   kernel-emu fastdiv-sweep D...
//       For each divisor D, every n in [0, 2^31) against a running quotient; exit 1 on the
//       first mismatch.
//
// Exit status: 0 ok, 1 a check above failed, 2 bad arguments or input.

#include "host_shim.h"

#include "../clamp.cu"
#include "../noise.cu"
#include "../stats.cu"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if !defined(__x86_64__) || defined(KERNEL_EMU_UCONTEXT)
#include <ucontext.h>
#endif

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

[[noreturn]] void fail(int code, const char* fmt, const char* what) {
    fprintf(stderr, "kernel-emu: ");
    fprintf(stderr, fmt, what);
    fprintf(stderr, "\n");
    exit(code);
}

std::vector<unsigned char> read_all(FILE* f) {
    std::vector<unsigned char> data;
    unsigned char buf[1 << 16];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + got);
    if (ferror(f)) fail(2, "%s", "cannot read stdin");
    return data;
}

void write_all(const void* p, size_t bytes) {
    if (bytes > 0 && fwrite(p, 1, bytes, stdout) != bytes) fail(2, "%s", "cannot write stdout");
    if (fflush(stdout) != 0) fail(2, "%s", "cannot write stdout");
}

// key=value arguments.
struct Args {
    std::map<std::string, std::string> kv;

    Args(int argc, char** argv, int first) {
        for (int i = first; i < argc; ++i) {
            const char* eq = strchr(argv[i], '=');
            if (!eq) fail(2, "argument '%s' is not key=value", argv[i]);
            kv[std::string(argv[i], (size_t)(eq - argv[i]))] = eq + 1;
        }
    }
    bool has(const char* key) const { return kv.count(key) != 0; }
    std::string str(const char* key, const char* fallback = nullptr) const {
        auto it = kv.find(key);
        if (it != kv.end()) return it->second;
        if (!fallback) fail(2, "missing argument %s=", key);
        return fallback;
    }
    uint64_t u64(const char* key) const {
        const std::string s = str(key);
        char* end = nullptr;
        errno = 0;
        const unsigned long long v = strtoull(s.c_str(), &end, 10);
        if (s.empty() || s[0] == '-' || *end != '\0' || errno != 0) fail(2, "bad number in %s=", key);
        return v;
    }
};

// Guard elements on each side of every buffer.
constexpr size_t GUARD = 1024;

// A buffer of n elements between two guards of all-ones bytes (or copies of the element
// fill_guards sets); data() is the first element.
template <typename T> struct Guarded {
    std::vector<T> mem;
    size_t n;
    unsigned char guard[sizeof(T)];

    explicit Guarded(size_t count) : mem(count + 2 * GUARD), n(count) {
        memset(static_cast<void*>(mem.data()), 0xFF, mem.size() * sizeof(T));
        memset(guard, 0xFF, sizeof guard);
    }
    T* data() { return mem.data() + GUARD; }
    void fill_guards(const unsigned char (&pattern)[sizeof(T)]) {
        memcpy(guard, pattern, sizeof guard);
        unsigned char* p = reinterpret_cast<unsigned char*>(mem.data());
        for (size_t i = 0; i < GUARD; ++i) {
            memcpy(p + i * sizeof(T), guard, sizeof guard);
            memcpy(p + (GUARD + n + i) * sizeof(T), guard, sizeof guard);
        }
    }
    bool guards_intact() const {
        const unsigned char* p = reinterpret_cast<const unsigned char*>(mem.data());
        for (size_t i = 0; i < GUARD; ++i)
            if (memcmp(p + i * sizeof(T), guard, sizeof guard) != 0 ||
                memcmp(p + (GUARD + n + i) * sizeof(T), guard, sizeof guard) != 0)
                return false;
        return true;
    }
};

// Consumes count elements of T from the input stream into a guarded buffer.
template <typename T>
Guarded<T> take(const std::vector<unsigned char>& in, size_t& at, uint64_t count, const char* what) {
    const size_t bytes = count * sizeof(T);
    if (count > (1ull << 40) || in.size() - at < bytes) fail(2, "stdin too short for %s", what);
    Guarded<T> b(count);
    if (bytes > 0) memcpy(static_cast<void*>(b.data()), in.data() + at, bytes);
    at += bytes;
    return b;
}

// Runs body() once per (block, thread) of a 1-D launch of grid x block threads.
template <typename F> void launch(uint32_t grid, uint32_t block, bool reverse, F&& body) {
    gridDim = dim3(grid, 1, 1);
    blockDim = dim3(block, 1, 1);
    for (uint64_t i = 0; i < (uint64_t)grid * block; ++i) {
        const uint64_t t = reverse ? (uint64_t)grid * block - 1 - i : i;
        blockIdx = make_uint3((unsigned int)(t / block), 0, 0);
        threadIdx = make_uint3((unsigned int)(t % block), 0, 0);
        body();
    }
}

// ---- Block scheduler (stats.cu) ---------------------------------------------------------------
//
// The stats kernels synchronise the threads of a block (__syncthreads, warp shuffles) and share
// memory between them, so a block cannot run one thread after another to completion. Here every
// thread of a block is a coroutine with its own stack, all on the one host thread. A thread runs
// until it reaches a barrier (host_shim.h: __syncthreads for the block, a shuffle for its warp)
// or returns, and then hands over to a thread that is free to go on: one that has not reached a
// barrier yet, or whose barrier every thread it waits for has reached. Which one, among those,
// is the policy's choice:
//
//   rr      round-robin in thread order (threads advance nearly in step, as warps do);
//   low     always the lowest-numbered thread: low threads run ahead as far as barriers allow;
//   high    the highest-numbered one: high threads run ahead (and blocks run last to first);
//   random  the first free one from a random thread on, cyclically (seeded; blocks run in a
//           random order too).
//
// Any interleaving at barrier granularity is a legal device schedule, so a kernel that is
// correct gives the same result under all of them up to the order of its f64 additions, while a
// missing barrier or a wrong exchange shows under some. Blocks run strictly one after another,
// which is also what makes host_shim.h's function-scope static a correct `__shared__` (one live
// block at a time). Barriers that not every thread reaches leave threads waiting with none free
// to run: the run fails with "deadlock" (exit 1), where a device would hang or be undefined.
// Shuffles are supported for full warps with mask 0xffffffff only (what stats.cu uses); lanes
// that call shuffles at different places in the code are paired up as if at one.
//
// What it cannot show: races finer than a barrier. A thread is never interrupted between two
// barriers, so every read-modify-write is atomic here (atomicAdd is just that), and a plain
// `+=` where an atomicAdd belongs would pass.
//
// Coroutines rather than host threads: a 256-thread barrier costs 0.3-1.6 ms between host
// threads on a 2-core machine, and a launch has thousands of barriers. The switch is a few
// instructions on x86-64 (emu_switch below); elsewhere, or built with -DKERNEL_EMU_UCONTEXT, it
// is POSIX swapcontext, which is correct too but ~20 times slower (it saves the FPU environment
// and makes a system call for the signal mask on every switch).

#if defined(__x86_64__) && !defined(KERNEL_EMU_UCONTEXT)
// emu_switch(save, to): saves the System V callee-saved registers on the current stack, stores
// the stack pointer in *save, loads `to` as the stack pointer, restores the registers saved
// there and returns into that context. The MXCSR and x87 control words, callee-saved too, are
// left alone: nothing here changes them. A new context is a stack set up by prepare().
asm(R"(
    .text
    .p2align 4
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
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
    .size emu_switch, .-emu_switch
)");
}  // namespace
extern "C" void emu_switch(void** save, void* to);
namespace {
#define EMU_ASM_SWITCH 1
#else
#define EMU_ASM_SWITCH 0
#endif

// A coroutine's saved context.
struct Context {
#if EMU_ASM_SWITCH
    void* sp = nullptr;
#else
    ucontext_t uc;
#endif
};

// Suspends the running context into `from` and resumes `to`.
void switch_context(Context& from, Context& to) {
#if EMU_ASM_SWITCH
    emu_switch(&from.sp, to.sp);
#else
    if (swapcontext(&from.uc, &to.uc) != 0) fail(2, "%s", "swapcontext failed");
#endif
}

// Makes `c` a fresh context that runs entry() on the stack [stack, stack + size) when switched
// to. entry() must never return (it switches away for good when done).
void prepare(Context& c, unsigned char* stack, size_t size, void (*entry)()) {
#if EMU_ASM_SWITCH
    // As if entry had just been called: its return address (never used) at a 16-byte boundary
    // + 8, below it emu_switch's return address (entry) and six zeroed registers.
    uintptr_t top = ((uintptr_t)(stack + size)) & ~(uintptr_t)15;
    uintptr_t* sp = reinterpret_cast<uintptr_t*>(top);
    *--sp = 0;
    *--sp = (uintptr_t)entry;
    for (int i = 0; i < 6; ++i) *--sp = 0;
    c.sp = sp;
#else
    if (getcontext(&c.uc) != 0) fail(2, "%s", "getcontext failed");
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_stack.ss_flags = 0;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
#endif
}

enum class Sched { RoundRobin, Low, High, Random };

// SplitMix64: the random policy's choices.
struct SplitMix {
    uint64_t s;
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    uint64_t below(uint64_t n) { return next() % n; }
};

constexpr size_t FIBER_STACK = 128 * 1024;

struct Fiber {
    enum State { Running, AtBlockBarrier, AtWarpBarrier, Done };
    Context ctx;
    std::unique_ptr<unsigned char[]> stack;
    State state = Done;
};

// One warp's shuffle exchange. A round is one barrier generation; lanes publish into slot[gen & 1]
// and read it after the barrier, so a lane that goes on to the next shuffle writes the other slot
// while slower lanes still read this one (and no lane can come back to this slot before every
// lane has passed the next barrier, i.e. has read it).
struct WarpSync {
    unsigned arrived = 0, mask = 0, size = 0;
    uint64_t gen = 0;
    unsigned char slot[2][32][16] = {};
};

struct BlockState {
    std::vector<Fiber> fibers;  // one per thread of the block; never resized during a launch
    std::vector<WarpSync> warps;
    Context scheduler;
    // Bit i: thread i is free to run (started and not yet resumed, or its barrier has opened
    // since it arrived there).
    std::vector<uint64_t> free;
    unsigned current = 0, last = 0, block_arrived = 0;
    bool active = false;
    Sched policy = Sched::RoundRobin;
    SplitMix rng{0};
    const std::function<void()>* body = nullptr;
};
BlockState blk;

void require_block_launch(const char* what) {
    if (!blk.active) fail(1, "%s outside a block-scheduled launch (stats kernels only)", what);
}

// Threads first..last are free to run: a barrier of theirs has opened, or the block starts.
void set_free(unsigned first, unsigned last) {
    for (unsigned i = first; i <= last; ++i) blk.free[i >> 6] |= 1ull << (i & 63);
}

// The first free thread at or after `from`, or -1.
int free_from(unsigned from) {
    const unsigned n = (unsigned)blk.fibers.size();
    if (from >= n) return -1;
    size_t w = from >> 6;
    uint64_t bits = blk.free[w] & (~0ull << (from & 63));
    for (;;) {
        if (bits) return (int)(w * 64 + (unsigned)__builtin_ctzll(bits));
        if (++w == blk.free.size()) return -1;
        bits = blk.free[w];
    }
}

// The last free thread, or -1.
int last_free() {
    for (size_t w = blk.free.size(); w-- > 0;)
        if (blk.free[w]) return (int)(w * 64 + 63 - (unsigned)__builtin_clzll(blk.free[w]));
    return -1;
}

// The next thread to resume, or -1 if none is free to run.
int pick() {
    const unsigned n = (unsigned)blk.fibers.size();
    const Sched policy = blk.policy;
    switch (policy) {
    case Sched::Low: return free_from(0);
    case Sched::High: return last_free();
    case Sched::RoundRobin:
    case Sched::Random: {
        const unsigned start = policy == Sched::Random ? (unsigned)blk.rng.below(n) : blk.last + 1;
        const int i = free_from(start);
        return i >= 0 ? i : free_from(0);
    }
    }
    return -1;
}

// Makes thread i the running one.
Fiber& take(unsigned i) {
    blk.free[i >> 6] &= ~(1ull << (i & 63));
    Fiber& f = blk.fibers[i];
    f.state = Fiber::Running;  // past its barrier, if it waited at one
    blk.current = blk.last = i;
    threadIdx = make_uint3(i, 0, 0);
    return f;
}

// The running thread stops (at a barrier, or for good when done): switches straight to the next
// thread the policy picks (back to the same one if it is that), or to the scheduler when no
// thread is free to run (the block is done, or deadlocked).
void suspend() {
    Fiber& self = blk.fibers[blk.current];
    const int next = pick();
    if (next < 0) {
        switch_context(self.ctx, blk.scheduler);
        return;
    }
    Fiber& f = take((unsigned)next);
    if (&f != &self) switch_context(self.ctx, f.ctx);
}

void fiber_main() {
    (*blk.body)();
    blk.fibers[blk.current].state = Fiber::Done;
    suspend();  // for good: a finished thread is never resumed
    fail(2, "%s", "a finished thread was resumed");
}

void run_block(uint3 block) {
    blockIdx = block;
    blk.block_arrived = 0;
    for (WarpSync& w : blk.warps) w.arrived = 0;
    for (Fiber& f : blk.fibers) {
        prepare(f.ctx, f.stack.get(), FIBER_STACK, fiber_main);
        f.state = Fiber::Running;
    }
    const unsigned n = (unsigned)blk.fibers.size();
    set_free(0, n - 1);
    blk.last = n - 1;
    // The threads pass control among themselves (suspend) and come back here when none is
    // free to run.
    for (int i; (i = pick()) >= 0;) switch_context(blk.scheduler, take((unsigned)i).ctx);
    unsigned at_block = 0, at_warp = 0;
    for (const Fiber& f : blk.fibers) {
        at_block += f.state == Fiber::AtBlockBarrier;
        at_warp += f.state == Fiber::AtWarpBarrier;
    }
    if (at_block + at_warp > 0) {
        char msg[200];
        snprintf(msg, sizeof msg,
                 "block (%u, %u): %u threads wait at __syncthreads and %u at warp shuffles that "
                 "the other threads never reach",
                 block.x, block.y, at_block, at_warp);
        fail(1, "deadlock in %s", msg);
    }
}

// Runs body() for every thread of a grid.x x grid.y launch of 1-D blocks of `block` threads,
// block by block, the threads of each block concurrently as described above.
template <typename F>
void launch_blocks(uint32_t grid_x, uint32_t grid_y, uint32_t block, Sched policy, uint64_t seed,
                   F&& body) {
    gridDim = dim3(grid_x, grid_y, 1);
    blockDim = dim3(block, 1, 1);
    const std::function<void()> fn(std::forward<F>(body));
    if (blk.fibers.size() != block) {
        blk.fibers = std::vector<Fiber>(block);
        for (Fiber& f : blk.fibers) f.stack.reset(new unsigned char[FIBER_STACK]);
    }
    blk.warps.assign((block + 31) / 32, WarpSync{});
    blk.free.assign((block + 63) / 64, 0);
    blk.body = &fn;
    blk.active = true;
    blk.policy = policy;
    blk.rng = SplitMix{seed};
    SplitMix& rng = blk.rng;
    const uint64_t blocks = (uint64_t)grid_x * grid_y;
    std::vector<uint64_t> order(blocks);
    for (uint64_t b = 0; b < blocks; ++b) order[b] = policy == Sched::High ? blocks - 1 - b : b;
    if (policy == Sched::Random)
        for (uint64_t b = blocks; b > 1; --b) std::swap(order[b - 1], order[rng.below(b)]);
    for (const uint64_t b : order)
        run_block(make_uint3((unsigned)(b % grid_x), (unsigned)(b / grid_x), 0));
    blk.active = false;
    blk.body = nullptr;
}

}  // namespace

// host_shim.h's hooks.
void emu_syncthreads() {
    require_block_launch("__syncthreads");
    blk.fibers[blk.current].state = Fiber::AtBlockBarrier;
    if (++blk.block_arrived == blk.fibers.size()) {
        blk.block_arrived = 0;
        set_free(0, (unsigned)blk.fibers.size() - 1);
    }
    suspend();
}

void emu_warp_exchange(unsigned int mask, const void* value, unsigned int size,
                       unsigned int src_lane, void* out) {
    require_block_launch("a warp shuffle");
    const unsigned t = blk.current, lane = t & 31u, w = t >> 5;
    if (blk.fibers.size() < (w + 1) * 32 || mask != 0xFFFFFFFFu)
        fail(1, "%s", "warp shuffle: only full warps with mask 0xffffffff are emulated");
    if (size == 0 || size > 16 || src_lane >= 32) fail(2, "%s", "warp shuffle: bad size or lane");
    WarpSync& ws = blk.warps[w];
    if (ws.arrived == 0) {
        ws.mask = mask;
        ws.size = size;
    } else if (ws.mask != mask || ws.size != size) {
        fail(1, "%s", "warp shuffle: the lanes of a warp disagree on the mask or the type");
    }
    const unsigned p = (unsigned)(ws.gen & 1);
    memcpy(ws.slot[p][lane], value, size);
    blk.fibers[t].state = Fiber::AtWarpBarrier;
    if (++ws.arrived == 32) {
        ws.arrived = 0;
        ++ws.gen;
        set_free(w * 32, w * 32 + 31);
    }
    suspend();
    memcpy(out, ws.slot[p][src_lane], size);
}

namespace {

// The extern "C" entry points for one element type.
template <typename T> struct Entries;
#define EMU_ENTRIES(TYPENAME, SUFFIX)                                     \
    template <> struct Entries<TYPENAME> {                                \
        static constexpr auto clamp = level_clamp_##SUFFIX;               \
        static constexpr auto clamp_expand = level_clamp_expand_##SUFFIX; \
        static constexpr auto noise = level_noise_##SUFFIX;               \
        static constexpr auto noise_expand = level_noise_expand_##SUFFIX; \
        static constexpr auto stats_dense = unit_stats_dense_##SUFFIX;    \
        static constexpr auto stats_maps = unit_stats_maps_##SUFFIX;      \
    };
EMU_ENTRIES(float, f32)
EMU_ENTRIES(double, f64)
EMU_ENTRIES(__half, f16)
EMU_ENTRIES(__nv_bfloat16, bf16)
#undef EMU_ENTRIES

enum class Index { Auto, Narrow, Wide };

struct Launch {
    uint32_t grid, block;
    bool reverse;
    Index index;
    uint64_t n, row_len, units, inner, per_level, levels;
};

Launch parse_launch(const Args& a, bool expand, uint64_t x_len) {
    Launch l;
    const uint64_t grid = a.u64("grid"), block = a.u64("block");
    if (grid == 0 || grid > 0x7FFFFFFFull || block == 0 || block > 1024)
        fail(2, "%s", "grid must be in [1, 2^31), block in [1, 1024]");
    l.grid = (uint32_t)grid;
    l.block = (uint32_t)block;
    const std::string order = a.str("order", "forward");
    if (order != "forward" && order != "reverse") fail(2, "bad order=%s", order.c_str());
    l.reverse = order == "reverse";
    const std::string index = a.str("index", "auto");
    if (index == "auto") l.index = Index::Auto;
    else if (index == "32") l.index = Index::Narrow;
    else if (index == "64") l.index = Index::Wide;
    else fail(2, "bad index=%s", index.c_str());
    l.n = a.u64("n");
    l.row_len = a.u64("row_len");
    l.units = a.u64("units");
    l.inner = a.u64("inner");
    l.per_level = a.u64("per_level");
    // The geometry src/ops/cuda.rs launches with (`Geometry`, src/ops/launch.rs): n > 0 whole
    // rows of whole levels.
    if (l.n == 0 || l.units == 0 || l.inner == 0 || l.per_level == 0 ||
        l.row_len != l.units * l.inner || l.n % (l.per_level * l.row_len) != 0)
        fail(2, "%s", "inconsistent geometry: need n = levels*per_level*units*inner > 0");
    l.levels = l.n / (l.per_level * l.row_len);
    if (x_len != (expand ? l.per_level * l.row_len : l.n))
        fail(2, "%s", "x_len must be per_level*row_len (expand) or n");
    if (l.index == Index::Narrow && l.n >= FAST_INDEX_LIMIT)
        fail(2, "%s", "index=32 needs n < 2^31 (the kernels' own condition for that path)");
    return l;
}

template <typename T, bool EXPAND>
void clamp_body(const Launch& l, const T* x, const uint8_t* keep, const T* values, T* out) {
    if (l.index == Index::Narrow) {
        launch(l.grid, l.block, l.reverse, [&] {
            level_clamp_body<T, uint32_t, EXPAND>(x, keep, values, out, (uint32_t)l.n,
                                                  (uint32_t)l.row_len, (uint32_t)l.units,
                                                  (uint32_t)l.inner, (uint32_t)l.per_level);
        });
    } else {
        launch(l.grid, l.block, l.reverse, [&] {
            level_clamp_body<T, uint64_t, EXPAND>(x, keep, values, out, l.n, l.row_len, l.units,
                                                  l.inner, l.per_level);
        });
    }
}

template <typename T>
int run_clamp(const Args& a, bool expand, const std::vector<unsigned char>& in) {
    const uint64_t x_len = a.u64("x_len");
    const Launch l = parse_launch(a, expand, x_len);
    if (a.u64("keep_len") != l.levels * l.units || a.u64("values_len") != l.units)
        fail(2, "%s", "keep_len must be levels*units and values_len units");
    size_t at = 0;
    Guarded<T> x = take<T>(in, at, x_len, "x");
    Guarded<uint8_t> keep = take<uint8_t>(in, at, l.levels * l.units, "keep");
    Guarded<T> values = take<T>(in, at, l.units, "values");
    if (at != in.size()) fail(2, "%s", "stdin longer than the inputs");
    Guarded<T> out(l.n);
    const T* xp = x.data();
    const uint8_t* kp = keep.data();
    const T* vp = values.data();
    T* op = out.data();
    if (l.index == Index::Auto) {
        const auto kernel = expand ? Entries<T>::clamp_expand : Entries<T>::clamp;
        launch(l.grid, l.block, l.reverse, [&] {
            kernel(xp, kp, vp, op, l.n, l.row_len, l.units, l.inner, l.per_level);
        });
    } else if (expand) {
        clamp_body<T, true>(l, xp, kp, vp, op);
    } else {
        clamp_body<T, false>(l, xp, kp, vp, op);
    }
    if (!out.guards_intact()) fail(1, "%s", "a thread wrote outside the output");
    write_all(op, l.n * sizeof(T));
    return 0;
}

struct Counter {
    uint64_t seed, level_offset, sample_offset, total_samples;
};

template <typename T, bool EXPAND>
void noise_body(const Launch& l, const Counter& c, const T* x, const float* s, T* out) {
    if (l.index == Index::Narrow) {
        launch(l.grid, l.block, l.reverse, [&] {
            level_noise_body<T, uint32_t, EXPAND>(
                x, s, out, (uint32_t)l.n, (uint32_t)l.row_len, (uint32_t)l.units,
                (uint32_t)l.inner, (uint32_t)l.per_level, c.seed, c.level_offset,
                c.sample_offset, c.total_samples);
        });
    } else {
        launch(l.grid, l.block, l.reverse, [&] {
            level_noise_body<T, uint64_t, EXPAND>(x, s, out, l.n, l.row_len, l.units, l.inner,
                                                  l.per_level, c.seed, c.level_offset,
                                                  c.sample_offset, c.total_samples);
        });
    }
}

template <typename T>
int run_noise(const Args& a, bool expand, const std::vector<unsigned char>& in) {
    const uint64_t x_len = a.u64("x_len");
    const Launch l = parse_launch(a, expand, x_len);
    if (a.u64("std_len") != l.levels * l.units) fail(2, "%s", "std_len must be levels*units");
    const Counter c = {a.u64("seed"), a.u64("level_offset"), a.u64("sample_offset"),
                       a.u64("total_samples")};
    size_t at = 0;
    Guarded<T> x = take<T>(in, at, x_len, "x");
    Guarded<float> std_ = take<float>(in, at, l.levels * l.units, "std");
    if (at != in.size()) fail(2, "%s", "stdin longer than the inputs");
    Guarded<T> out(l.n);
    const T* xp = x.data();
    const float* sp = std_.data();
    T* op = out.data();
    if (l.index == Index::Auto) {
        const auto kernel = expand ? Entries<T>::noise_expand : Entries<T>::noise;
        launch(l.grid, l.block, l.reverse, [&] {
            kernel(xp, sp, op, l.n, l.row_len, l.units, l.inner, l.per_level, c.seed,
                   c.level_offset, c.sample_offset, c.total_samples);
        });
    } else if (expand) {
        noise_body<T, true>(l, c, xp, sp, op);
    } else {
        noise_body<T, false>(l, c, xp, sp, op);
    }
    if (!out.guards_intact()) fail(1, "%s", "a thread wrote outside the output");
    write_all(op, l.n * sizeof(T));
    return 0;
}

// The statistics pass as src/ops/cuda.rs (`unit_sums`) launches it: one zeroed f64 buffer of
// (2 + classes) x units; unit_stats_* adds into rows 0 (sum), 1 (sum_sq) and 2.. (class_sums).
template <typename T>
int run_stats(const Args& a, const std::vector<unsigned char>& in) {
    const uint64_t rows = a.u64("rows"), units = a.u64("units"), inner = a.u64("inner"),
                   classes = a.u64("classes");
    if (rows == 0 || units == 0 || inner == 0)
        fail(2, "%s", "rows, units and inner must be >= 1 (src/ops/cuda.rs launches nothing else)");
    if (rows > (1ull << 32) || units > (1ull << 32) || inner > (1ull << 32) ||
        classes > (1ull << 20) || rows * units * inner > (1ull << 34))
        fail(2, "%s", "geometry too large to emulate");
    const std::string shape = a.str("shape", "auto");
    bool dense;
    if (shape == "auto") dense = inner == 1;
    else if (shape == "dense") dense = true;
    else if (shape == "maps") dense = false;
    else fail(2, "bad shape=%s", shape.c_str());
    if (dense && inner != 1) fail(2, "%s", "the dense kernels need inner=1");
    const uint64_t grid = a.u64("grid"), grid_y = a.u64("grid_y");
    const uint64_t block = a.has("block") ? a.u64("block") : STATS_THREADS;
    if (grid == 0 || grid > 0x7FFFFFFFull || grid_y == 0 || grid_y > 65535 || block == 0 ||
        block > 1024)
        fail(2, "%s", "grid must be in [1, 2^31), grid_y in [1, 65535], block in [1, 1024]");
    if (grid * grid_y > (1ull << 24)) fail(2, "%s", "more than 2^24 blocks: too many to emulate");
    // block_sum keeps one partial per warp in shared[STATS_THREADS / 32].
    if (!dense && (block % 32 != 0 || block > STATS_THREADS))
        fail(2, "%s", "the maps kernels need block a multiple of 32, at most STATS_THREADS");
    const std::string sched = a.str("sched", "rr");
    Sched policy;
    if (sched == "rr") policy = Sched::RoundRobin;
    else if (sched == "low") policy = Sched::Low;
    else if (sched == "high") policy = Sched::High;
    else if (sched == "random") policy = Sched::Random;
    else fail(2, "bad sched=%s", sched.c_str());
    const uint64_t seed = a.has("seed") ? a.u64("seed") : 1;

    size_t at = 0;
    Guarded<T> x = take<T>(in, at, rows * units * inner, "x");
    Guarded<uint32_t> labels = take<uint32_t>(in, at, rows, "labels");
    if (at != in.size()) fail(2, "%s", "stdin longer than the inputs");
    Guarded<double> out((2 + classes) * units);
    memset(static_cast<void*>(out.data()), 0, out.n * sizeof(double));  // alloc_zeros
    // The output's guards hold a signalling NaN, which an addition (an atomicAdd that strays
    // there) turns quiet, changing its bits; the all-ones quiet NaN would come back unchanged.
    const uint64_t snan = 0x7FF0DEADBEEF0001ull;
    unsigned char snan_bytes[sizeof(double)];
    memcpy(snan_bytes, &snan, sizeof snan_bytes);
    out.fill_guards(snan_bytes);
    const T* xp = x.data();
    const uint32_t* lp = labels.data();
    double* sum = out.data();
    double* sum_sq = sum + units;
    double* class_sums = sum + 2 * units;
    const uint32_t gx = (uint32_t)grid, gy = (uint32_t)grid_y, b = (uint32_t)block;
    if (dense) {
        launch_blocks(gx, gy, b, policy, seed, [&] {
            Entries<T>::stats_dense(xp, lp, sum, sum_sq, class_sums, rows, units, classes);
        });
    } else {
        launch_blocks(gx, gy, b, policy, seed, [&] {
            Entries<T>::stats_maps(xp, lp, sum, sum_sq, class_sums, rows, units, inner, classes);
        });
    }
    if (!out.guards_intact()) fail(1, "%s", "a thread wrote outside the output");
    write_all(sum, out.n * sizeof(double));
    return 0;
}

int stats(const Args& a) {
    const std::string dtype = a.str("dtype");
    const std::vector<unsigned char> in = read_all(stdin);
    if (dtype == "f32") return run_stats<float>(a, in);
    if (dtype == "f64") return run_stats<double>(a, in);
    if (dtype == "f16") return run_stats<__half>(a, in);
    if (dtype == "bf16") return run_stats<__nv_bfloat16>(a, in);
    fail(2, "unknown dtype=%s", dtype.c_str());
}

bool strip_prefix(std::string& s, const char* prefix) {
    const size_t k = strlen(prefix);
    if (s.compare(0, k, prefix) != 0) return false;
    s.erase(0, k);
    return true;
}

int run(const Args& a) {
    const std::string kernel = a.str("kernel");
    std::string dtype = kernel;
    bool clamp, expand;
    if (strip_prefix(dtype, "level_clamp_expand_")) clamp = true, expand = true;
    else if (strip_prefix(dtype, "level_clamp_")) clamp = true, expand = false;
    else if (strip_prefix(dtype, "level_noise_expand_")) clamp = false, expand = true;
    else if (strip_prefix(dtype, "level_noise_")) clamp = false, expand = false;
    else fail(2, "unknown kernel %s", kernel.c_str());
    const std::vector<unsigned char> in = read_all(stdin);
    if (dtype == "f32") return clamp ? run_clamp<float>(a, expand, in) : run_noise<float>(a, expand, in);
    if (dtype == "f64") return clamp ? run_clamp<double>(a, expand, in) : run_noise<double>(a, expand, in);
    if (dtype == "f16") return clamp ? run_clamp<__half>(a, expand, in) : run_noise<__half>(a, expand, in);
    if (dtype == "bf16")
        return clamp ? run_clamp<__nv_bfloat16>(a, expand, in) : run_noise<__nv_bfloat16>(a, expand, in);
    fail(2, "unknown kernel %s", kernel.c_str());
}

int fastdiv() {
    const std::vector<unsigned char> in = read_all(stdin);
    if (in.size() % 8 != 0) fail(2, "%s", "stdin must be pairs of u32");
    std::vector<uint32_t> pairs(in.size() / 4), out(in.size() / 8);
    if (!in.empty()) memcpy(pairs.data(), in.data(), in.size());
    for (size_t i = 0; i < out.size(); ++i) {
        const uint32_t d = pairs[2 * i], n = pairs[2 * i + 1];
        if (d == 0) fail(2, "%s", "divisor 0");
        out[i] = FastDivU32(d).div(n);
    }
    write_all(out.data(), out.size() * sizeof(uint32_t));
    return 0;
}

int fastdiv_sweep(int argc, char** argv) {
    for (int i = 2; i < argc; ++i) {
        char* end = nullptr;
        const unsigned long long d = strtoull(argv[i], &end, 10);
        if (*end != '\0' || d == 0 || d >= FAST_INDEX_LIMIT) fail(2, "bad divisor %s", argv[i]);
        const FastDivU32 f((uint32_t)d);
        uint32_t q = 0, r = 0;
        for (uint32_t n = 0; n < (uint32_t)FAST_INDEX_LIMIT; ++n) {
            if (f.div(n) != q) {
                fprintf(stderr, "kernel-emu: fastdiv-sweep: %u / %llu gave %u, want %u\n", n, d,
                        f.div(n), q);
                return 1;
            }
            if (++r == d) r = 0, ++q;
        }
        printf("fastdiv-sweep: d=%llu: all 2^31 quotients exact\n", d);
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc >= 2 && strcmp(argv[1], "run") == 0) return run(Args(argc, argv, 2));
    if (argc >= 2 && strcmp(argv[1], "stats") == 0) return stats(Args(argc, argv, 2));
    if (argc == 2 && strcmp(argv[1], "fastdiv") == 0) return fastdiv();
    if (argc >= 3 && strcmp(argv[1], "fastdiv-sweep") == 0) return fastdiv_sweep(argc, argv);
    fprintf(stderr, "usage: kernel-emu run kernel=NAME ... | stats dtype=T ... | fastdiv | "
                    "fastdiv-sweep D... "
                    "(see kernels/emu/emulate.cpp)\n");
    return 2;
}
