// CPU emulation of nh_fast.cu's unit and top-level KERNELS themselves (nhf_units, nhf_top_chunks,
// nhf_finalize), not just their __host__ __device__ cores: the kernel bodies, extracted from the
// source by tests/backends/cuda/test_nh_fast_kernel_emu.py into "nhf_kernels.inc", are compiled
// as host code with one std::thread per CUDA thread, __shared__ as static storage (one block runs
// at a time) and __syncthreads as a std::barrier (a thread that skips a barrier hangs the block:
// the test's timeout catches it). Buffers are exact-size heap allocations, so an ASan build flags
// any read or write past them.
//
//   nhf_kernel_emu units UNITKEY TAGS BEGIN END -> digests of units [BEGIN, END), hex
//   nhf_kernel_emu top TOPKEY UNITS N           -> nhf_top_chunks (+ nhf_finalize) digest, hex
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#define VR_NO_KERNELS 1
#include "nh_fast.cu"
#include "harness_io.h"

#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __global__
#define __global__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
struct emu_dim {
    unsigned x, y, z;
};
static thread_local emu_dim emu_tid, emu_bid;
static emu_dim emu_bdim;
#undef threadIdx
#undef blockIdx
#undef blockDim
#define threadIdx emu_tid
#define blockIdx emu_bid
#define blockDim emu_bdim
static std::barrier<>* emu_bar;
#define __syncthreads() emu_bar->arrive_and_wait()

#include "nhf_kernels.inc"

template <class F>
static void run_grid(unsigned grid, unsigned threads, F f) {
    emu_bdim = {threads, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> bar(threads);
        emu_bar = &bar;
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < threads; ++t)
            ts.emplace_back([=] {
                emu_tid = {t, 0, 0};
                emu_bid = {b, 0, 0};
                f();
            });
        for (auto& th : ts) th.join();
    }
}

static u8* exact(size_t n) {  // 256-aligned (as scratch is), exactly n bytes for ASan
    void* p = nullptr;
    if (posix_memalign(&p, 256, n ? n : 1)) std::exit(4);
    return static_cast<u8*>(p);
}

int main(int argc, char** argv) {
    if (argc < 5) return 2;
    std::vector<u8> key = slurp(argv[2]);
    std::vector<u8> data = slurp(argv[3]);
    if (key.size() != 32) return 3;
    u8* k = exact(32);
    std::memcpy(k, key.data(), 32);
    if (!std::strcmp(argv[1], "units") && argc == 6) {
        const u64 leaves = data.size() / NHF_TAG;
        const u64 begin = std::strtoull(argv[4], nullptr, 10), end = std::strtoull(argv[5], nullptr, 10);
        u8* tags = exact(data.size());
        std::memcpy(tags, data.data(), data.size());
        const u64 units = (leaves + NHF_LEAVES_PER_UNIT - 1) / NHF_LEAVES_PER_UNIT;
        u8* out = exact(32 * units);
        std::memset(out, 0xAA, 32 * units);
        const unsigned grid = (unsigned)((end - begin + NHF_UNITS_PER_BLOCK - 1) / NHF_UNITS_PER_BLOCK);
        run_grid(grid, NHF_UNITS_THREADS, [&] {
            nhf_units(tags, leaves, reinterpret_cast<const u32*>(k), begin, end, out);
        });
        hex(out, 32 * units);  // all units: those outside [begin, end) must stay 0xAA
    } else if (!std::strcmp(argv[1], "top") && argc == 5) {
        const u64 units = data.size() / 32, n = std::strtoull(argv[4], nullptr, 10);
        const u64 chunks = (32 * units + 8 + 1023) / 1024;
        u8* msg = exact(32 * units + 8);  // the unit digests and the 8 writable bytes after them
        std::memcpy(msg, data.data(), 32 * units);
        std::memset(msg + 32 * units, 0xEE, 8);
        u32* work = reinterpret_cast<u32*>(exact(chunks == 1 ? 0 : 64 * chunks));
        u32* out = reinterpret_cast<u32*>(exact(32));
        const unsigned grid = (unsigned)((chunks + NHF_TOP_THREADS - 1) / NHF_TOP_THREADS);
        run_grid(grid, NHF_TOP_THREADS, [&] {
            nhf_top_chunks(msg, units, n, reinterpret_cast<const u32*>(k), work, out);
        });
        if (chunks > 1) {
            run_grid(1, NHF_FIN_THREADS, [&] {
                nhf_finalize(units, reinterpret_cast<const u32*>(k), work, out);
            });
        }
        hex(reinterpret_cast<const u8*>(out), 32);
    } else {
        return 2;
    }
    std::printf("\n");
    return 0;
}
