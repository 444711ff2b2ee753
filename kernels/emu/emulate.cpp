// Host emulation of the CUDA kernels in kernels/clamp.cu and kernels/noise.cu: their unmodified
// source, compiled by a host C++17 compiler against host_shim.h, run one (block, thread) at a
// time over a whole launch. Sequential execution is a valid schedule for these kernels: no
// thread reads anything another writes, and there is no shared memory, barrier or atomic. The
// Rust test tests/kernel_emulation.rs compares the results with the crate's CPU ops.
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

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <map>
#include <string>
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

// A buffer of n elements between two guards of all-ones bytes; data() is the first element.
template <typename T> struct Guarded {
    std::vector<T> mem;
    size_t n;

    explicit Guarded(size_t count) : mem(count + 2 * GUARD), n(count) {
        memset(static_cast<void*>(mem.data()), 0xFF, mem.size() * sizeof(T));
    }
    T* data() { return mem.data() + GUARD; }
    bool guards_intact() const {
        const unsigned char* p = reinterpret_cast<const unsigned char*>(mem.data());
        const size_t g = GUARD * sizeof(T), total = mem.size() * sizeof(T);
        for (size_t i = 0; i < g; ++i)
            if (p[i] != 0xFF || p[total - 1 - i] != 0xFF) return false;
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

// The extern "C" entry points for one element type.
template <typename T> struct Entries;
#define EMU_ENTRIES(TYPENAME, SUFFIX)                                   \
    template <> struct Entries<TYPENAME> {                              \
        static constexpr auto clamp = level_clamp_##SUFFIX;             \
        static constexpr auto clamp_expand = level_clamp_expand_##SUFFIX; \
        static constexpr auto noise = level_noise_##SUFFIX;             \
        static constexpr auto noise_expand = level_noise_expand_##SUFFIX; \
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
    // The geometry src/ops/cuda.rs launches with (`Geometry`): n > 0 whole rows of whole levels.
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
    if (argc == 2 && strcmp(argv[1], "fastdiv") == 0) return fastdiv();
    if (argc >= 3 && strcmp(argv[1], "fastdiv-sweep") == 0) return fastdiv_sweep(argc, argv);
    fprintf(stderr, "usage: kernel-emu run kernel=NAME ... | fastdiv | fastdiv-sweep D... "
                    "(see kernels/emu/emulate.cpp)\n");
    return 2;
}
