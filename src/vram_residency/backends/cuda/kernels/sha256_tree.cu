// sha256-tree-v1 on the GPU (specs/sha256-tree-v1.md): one thread block per aligned 1 MiB unit,
// one thread per 4 KiB leaf, the unit's 256 leaf hashes reduced in shared memory, so a single
// launch yields every unit digest. A second kernel reduces unit digests 256 at a time.
//
// Compiled at run time by NVRTC (no standard headers), and also by nvcc as host code for the
// CPU harness: the SHA-256 core is __host__ __device__.
//
// Why the code looks the way it does: SHA-256 here is bound by the integer pipe, not by memory
// (anchors.md). Every compression is fully unrolled with the round constants as immediates, the
// message schedule stays in 16 registers, byte swaps are single PRMTs, rotations are single
// funnel shifts, and additions are written so that ptxas can use three-input IADD3 or move them
// to the FMA pipe as IMAD.

#include "vr_common.cuh"

// Which operations go to the FMA pipe: a bit mask (VR_SHA_VARIANT overrides the default).
//    1: all additions but h + W + K (one IADD3 with an immediate)
//    2: the schedule's two shifts and one rotation of each small sigma (IMAD.HI + IMAD)
//    4: one rotation of Sigma0          8: one rotation of Sigma1
//   16: h + W + K as two IMADs, K read from __constant__ memory that the host fills
//   32: the schedule's two shifts only (IMAD.HI)
//   64: h + W + K as two IMADs, K an immediate multiplied by a register that holds 1
// Measured on an H200 (bench/gpu_bench.py --tune, 4 GiB shards, device time): 1 beat 0 by 12%
// (844 against 754 GB/s). Rotations and shifts through IMAD.HI (2, 4, 8, 32) gained nothing or
// lost, so IMAD.HI costs far more than one FMA slot; 16 made ptxas hold all 64 round constants in
// registers (138); 65 takes the last IADD3 off the ALU pipe (1,043 ALU instructions per
// compression against 1,107) and still lost 9% (757 against 833 GB/s): past this point the FMA
// pipe and issue slots are not free either.
#ifndef VR_SHA_VARIANT
#define VR_SHA_VARIANT 1
#endif

#define VR_F_ADD 1
#define VR_F_SIG 2
#define VR_F_S0 4
#define VR_F_S1 8
#define VR_F_K 16
#define VR_F_SHR 32
#define VR_F_KIMM 64

#ifdef __CUDACC__
__constant__ u32 vr_sha_k[64];
#endif

template <int V> VR_HD u32 sha_add(u32 a, u32 b) {
    if constexpr ((V & VR_F_ADD) != 0) return vr_addf(a, b); else return a + b;
}
template <int V> VR_HD u32 sha_hwk(u32 h, u32 w, u32 k, int t) {
#ifdef __CUDA_ARCH__
    if constexpr ((V & VR_F_K) != 0) return vr_addf(vr_addf(h, w), vr_sha_k[t]);
    if constexpr ((V & VR_F_KIMM) != 0) {
        u32 r;
        asm("mad.lo.u32 %0, %1, %2, %3;" : "=r"(r) : "r"(vr_mulc[0]), "r"(k), "r"(vr_addf(h, w)));
        return r;
    }
#endif
    (void)t;
    return h + w + k;
}
template <int V> VR_HD u32 sha_S0(u32 x) {
    if constexpr ((V & VR_F_S0) != 0) return vr_rotrf(x, 2) ^ vr_rotr(x, 13) ^ vr_rotr(x, 22);
    else return vr_rotr(x, 2) ^ vr_rotr(x, 13) ^ vr_rotr(x, 22);
}
template <int V> VR_HD u32 sha_S1(u32 x) {
    if constexpr ((V & VR_F_S1) != 0) return vr_rotrf(x, 6) ^ vr_rotr(x, 11) ^ vr_rotr(x, 25);
    else return vr_rotr(x, 6) ^ vr_rotr(x, 11) ^ vr_rotr(x, 25);
}
template <int V> VR_HD u32 sha_s0(u32 x) {
    if constexpr ((V & VR_F_SIG) != 0) return vr_rotrf(x, 7) ^ vr_rotr(x, 18) ^ vr_shrf(x, 3);
    else if constexpr ((V & VR_F_SHR) != 0) return vr_rotr(x, 7) ^ vr_rotr(x, 18) ^ vr_shrf(x, 3);
    else return vr_rotr(x, 7) ^ vr_rotr(x, 18) ^ (x >> 3);
}
template <int V> VR_HD u32 sha_s1(u32 x) {
    if constexpr ((V & VR_F_SIG) != 0) return vr_rotrf(x, 17) ^ vr_rotr(x, 19) ^ vr_shrf(x, 10);
    else if constexpr ((V & VR_F_SHR) != 0) return vr_rotr(x, 17) ^ vr_rotr(x, 19) ^ vr_shrf(x, 10);
    else return vr_rotr(x, 17) ^ vr_rotr(x, 19) ^ (x >> 10);
}

// ---------------------------------------------------------------------------------------------
// SHA-256 compression (FIPS 180-4), state in s[0..7], message words in w[0..15] (big-endian
// words already). w is used as the rolling message schedule and is clobbered.

#define VR_CH(e, f, g) ((g) ^ ((e) & ((f) ^ (g))))
#define VR_MAJ(a, b, c) (((a) & (b)) | ((c) & ((a) | (b))))

// One round; the eight working variables rotate by renaming, not by moves.
#define VR_RND(a, b, c, d, e, f, g, h, wi, k, t)                                                  \
    do {                                                                                         \
        u32 x_ = sha_hwk<V>((h), (wi), (k), (t));                                                \
        u32 t1_ = sha_add<V>(x_, sha_add<V>(sha_S1<V>(e), VR_CH((e), (f), (g))));               \
        u32 t2_ = sha_add<V>(sha_S0<V>(a), VR_MAJ((a), (b), (c)));                               \
        (d) = sha_add<V>((d), t1_);                                                              \
        (h) = sha_add<V>(t1_, t2_);                                                              \
    } while (0)

// Schedule step for round i >= 16, in place in the 16-word ring.
#define VR_W(w, i)                                                                               \
    (w[(i) & 15] = sha_add<V>(sha_add<V>(w[(i) & 15], sha_s0<V>(w[((i) - 15) & 15])),            \
                              sha_add<V>(w[((i) - 7) & 15], sha_s1<V>(w[((i) - 2) & 15]))))

#define VR_R8(w, i, k0, k1, k2, k3, k4, k5, k6, k7)                                               \
    VR_RND(a, b, c, d, e, f, g, h, w[((i) + 0) & 15], k0, (i) + 0);                              \
    VR_RND(h, a, b, c, d, e, f, g, w[((i) + 1) & 15], k1, (i) + 1);                              \
    VR_RND(g, h, a, b, c, d, e, f, w[((i) + 2) & 15], k2, (i) + 2);                              \
    VR_RND(f, g, h, a, b, c, d, e, w[((i) + 3) & 15], k3, (i) + 3);                              \
    VR_RND(e, f, g, h, a, b, c, d, w[((i) + 4) & 15], k4, (i) + 4);                              \
    VR_RND(d, e, f, g, h, a, b, c, w[((i) + 5) & 15], k5, (i) + 5);                              \
    VR_RND(c, d, e, f, g, h, a, b, w[((i) + 6) & 15], k6, (i) + 6);                              \
    VR_RND(b, c, d, e, f, g, h, a, w[((i) + 7) & 15], k7, (i) + 7)

#define VR_SCHED8(w, i)                                                                          \
    VR_W(w, (i) + 0); VR_W(w, (i) + 1); VR_W(w, (i) + 2); VR_W(w, (i) + 3);                      \
    VR_W(w, (i) + 4); VR_W(w, (i) + 5); VR_W(w, (i) + 6); VR_W(w, (i) + 7)

// V selects the pipe balancing above; V = 0 is plain C, which the compiler can constant-fold
// (used for blocks whose words are all constants).
template <int V> VR_HD void sha256_compress_v(u32 s[8], u32 w[16]) {
    u32 a = s[0], b = s[1], c = s[2], d = s[3], e = s[4], f = s[5], g = s[6], h = s[7];
    VR_R8(w, 0, 0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u,
          0x923f82a4u, 0xab1c5ed5u);
    VR_R8(w, 8, 0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu,
          0x9bdc06a7u, 0xc19bf174u);
    VR_SCHED8(w, 16);
    VR_R8(w, 16, 0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau,
          0x5cb0a9dcu, 0x76f988dau);
    VR_SCHED8(w, 24);
    VR_R8(w, 24, 0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u,
          0x06ca6351u, 0x14292967u);
    VR_SCHED8(w, 32);
    VR_R8(w, 32, 0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu,
          0x81c2c92eu, 0x92722c85u);
    VR_SCHED8(w, 40);
    VR_R8(w, 40, 0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u,
          0xf40e3585u, 0x106aa070u);
    VR_SCHED8(w, 48);
    VR_R8(w, 48, 0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au,
          0x5b9cca4fu, 0x682e6ff3u);
    VR_SCHED8(w, 56);
    VR_R8(w, 56, 0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu,
          0xbef9a3f7u, 0xc67178f2u);
    s[0] = sha_add<V>(s[0], a); s[1] = sha_add<V>(s[1], b); s[2] = sha_add<V>(s[2], c);
    s[3] = sha_add<V>(s[3], d); s[4] = sha_add<V>(s[4], e); s[5] = sha_add<V>(s[5], f);
    s[6] = sha_add<V>(s[6], g); s[7] = sha_add<V>(s[7], h);
}

VR_HD void sha256_compress(u32 s[8], u32 w[16]) { sha256_compress_v<VR_SHA_VARIANT>(s, w); }

VR_HD void sha256_init(u32 s[8]) {
    s[0] = 0x6a09e667u; s[1] = 0xbb67ae85u; s[2] = 0x3c6ef372u; s[3] = 0xa54ff53au;
    s[4] = 0x510e527fu; s[5] = 0x9b05688cu; s[6] = 0x1f83d9abu; s[7] = 0x5be0cd19u;
}

// The last block of a message whose final block holds only `first` in its first word and the
// bit length in the last: for a full 4096-byte leaf, (0x00 suffix, 0x80 pad) and 4097*8 bits;
// for a parent's second block, (0x01 suffix, 0x80 pad) and 65*8 bits. With literal arguments the
// whole message schedule folds into constants at compile time.
VR_HD void sha256_compress_tail(u32 s[8], u32 first, u32 bits) {
    u32 w[16] = {first, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, bits};
    sha256_compress_v<0>(s, w);
}

// SHA-256 over `len` bytes at p (any alignment, byte loads), followed by an optional suffix
// byte (suffix < 0: none). The general path: message tails, test vectors, partial leaves.
VR_HD void sha256_bytes(const u8* p, u64 len, int suffix, u32 s[8]) {
    sha256_init(s);
    u64 total = len + (suffix >= 0 ? 1u : 0u);
    u64 off = 0;
    u32 w[16];
    // Full blocks taken straight from the input.
    while (off + 64 <= len) {
        for (int i = 0; i < 16; ++i) {
            const u8* q = p + off + 4 * i;
            w[i] = ((u32)q[0] << 24) | ((u32)q[1] << 16) | ((u32)q[2] << 8) | (u32)q[3];
        }
        sha256_compress(s, w);
        off += 64;
    }
    // The rest of the input, the suffix, 0x80, zeros and the 64-bit big-endian bit length: one
    // or two more blocks.
    u8 tail[128];
    u32 rem = (u32)(len - off);
    for (u32 i = 0; i < 128; ++i) tail[i] = 0;
    for (u32 i = 0; i < rem; ++i) tail[i] = p[off + i];
    u32 pos = rem;
    if (suffix >= 0) tail[pos++] = (u8)suffix;
    tail[pos++] = 0x80;
    u32 blocks = pos + 8 <= 64 ? 1u : 2u;
    u64 bits = total * 8u;
    for (int i = 0; i < 8; ++i) tail[blocks * 64 - 1 - i] = (u8)(bits >> (8 * i));
    for (u32 blk = 0; blk < blocks; ++blk) {
        for (int i = 0; i < 16; ++i) {
            const u8* q = tail + blk * 64 + 4 * i;
            w[i] = ((u32)q[0] << 24) | ((u32)q[1] << 16) | ((u32)q[2] << 8) | (u32)q[3];
        }
        sha256_compress(s, w);
    }
}

// Parent node: SHA-256(left || right || 0x01), children as state words.
VR_HD void sha256_parent(const u32 l[8], const u32 r[8], u32 out[8]) {
    u32 w[16];
    for (int i = 0; i < 8; ++i) { w[i] = l[i]; w[8 + i] = r[i]; }
    sha256_init(out);
    sha256_compress(out, w);
    sha256_compress_tail(out, 0x01800000u, 65u * 8u);
}

// ---------------------------------------------------------------------------------------------
// Device-only fast paths and kernels.
// The CPU harness defines VR_NO_KERNELS and includes this file for the __host__ __device__ core.
#ifndef VR_NO_KERNELS

#define VR_LEAF 4096u
#define VR_UNIT_SHIFT 20
#define VR_LEAVES_PER_UNIT 256u

// Full 64-byte blocks from 16-byte aligned global memory: four 16-byte loads per block, the next
// block's loads issued before this block's rounds so that memory latency hides behind them.
// VR_SHA_PREFETCH 0: each block's loads are issued right before its rounds (16 registers fewer,
// so more threads fit on an SM, which then hide the load latency instead).
#ifndef VR_SHA_PREFETCH
#define VR_SHA_PREFETCH 1
#endif
__device__ __forceinline__ void sha256_blocks16(u32 s[8], const uint4* __restrict__ p, u32 nblocks) {
#if VR_SHA_PREFETCH
    uint4 q0 = __ldg(p + 0), q1 = __ldg(p + 1), q2 = __ldg(p + 2), q3 = __ldg(p + 3);
#endif
#pragma unroll 1
    for (u32 blk = 0; blk < nblocks; ++blk) {
#if !VR_SHA_PREFETCH
        const uint4* cur = p + 4 * blk;
        uint4 q0 = __ldg(cur + 0), q1 = __ldg(cur + 1), q2 = __ldg(cur + 2), q3 = __ldg(cur + 3);
#endif
        u32 w[16] = {vr_bswap(q0.x), vr_bswap(q0.y), vr_bswap(q0.z), vr_bswap(q0.w),
                     vr_bswap(q1.x), vr_bswap(q1.y), vr_bswap(q1.z), vr_bswap(q1.w),
                     vr_bswap(q2.x), vr_bswap(q2.y), vr_bswap(q2.z), vr_bswap(q2.w),
                     vr_bswap(q3.x), vr_bswap(q3.y), vr_bswap(q3.z), vr_bswap(q3.w)};
#if VR_SHA_PREFETCH
        if (blk + 1 < nblocks) {
            const uint4* nx = p + 4 * (blk + 1);
            q0 = __ldg(nx + 0); q1 = __ldg(nx + 1); q2 = __ldg(nx + 2); q3 = __ldg(nx + 3);
        }
#endif
        sha256_compress(s, w);
    }
}

// Leaf hash of `len` bytes at p (16-byte aligned): SHA-256(chunk || 0x00).
__device__ __forceinline__ void sha256_leaf(const u8* __restrict__ p, u32 len, u32 s[8]) {
    if (len == VR_LEAF) {
        sha256_init(s);
        sha256_blocks16(s, reinterpret_cast<const uint4*>(p), VR_LEAF / 64);
        // 0x00 suffix, 0x80 pad, 4097 * 8 bits: a constant block.
        sha256_compress_tail(s, 0x00800000u, (VR_LEAF + 1) * 8u);
        return;
    }
    // A partial leaf (the shard's last): full blocks with vector loads, the tail by bytes.
    u32 full = len / 64;
    u32 t[8];
    sha256_init(t);
    if (full) sha256_blocks16(t, reinterpret_cast<const uint4*>(p), full);
    // Finish with the generic path on the remaining bytes, continuing from state t.
    u32 rem = len - full * 64;
    u8 tail[128];
    for (u32 i = 0; i < 128; ++i) tail[i] = 0;
    for (u32 i = 0; i < rem; ++i) tail[i] = p[full * 64 + i];
    tail[rem] = 0x00;
    tail[rem + 1] = 0x80;
    u32 blocks = rem + 2 + 8 <= 64 ? 1u : 2u;
    u64 bits = ((u64)len + 1u) * 8u;
    for (int i = 0; i < 8; ++i) tail[blocks * 64 - 1 - i] = (u8)(bits >> (8 * i));
    for (u32 blk = 0; blk < blocks; ++blk) {
        u32 w[16];
        for (int i = 0; i < 16; ++i) {
            const u8* q = tail + blk * 64 + 4 * i;
            w[i] = ((u32)q[0] << 24) | ((u32)q[1] << 16) | ((u32)q[2] << 8) | (u32)q[3];
        }
        sha256_compress(t, w);
    }
    for (int i = 0; i < 8; ++i) s[i] = t[i];
}

// The unit subtree and tree-level reductions: vr_block_reduce with the spec's parent hash.
template <int W>
__device__ __forceinline__ void sha256_block_reduce(u32 (*node)[W], u32 count) {
    vr_block_reduce(node, count, [](u32 l[8], u32 r[8], u32 o[8], u32) { sha256_parent(l, r, o); });
}

__device__ __forceinline__ void store_digest(u8* __restrict__ out, const u32 s[8]) {
    uint4* o = reinterpret_cast<uint4*>(out);
    o[0] = make_uint4(vr_bswap(s[0]), vr_bswap(s[1]), vr_bswap(s[2]), vr_bswap(s[3]));
    o[1] = make_uint4(vr_bswap(s[4]), vr_bswap(s[5]), vr_bswap(s[6]), vr_bswap(s[7]));
}

__device__ __forceinline__ void load_digest(const u8* __restrict__ in, u32 s[8]) {
    const uint4* q = reinterpret_cast<const uint4*>(in);
    uint4 a = q[0], b = q[1];
    s[0] = vr_bswap(a.x); s[1] = vr_bswap(a.y); s[2] = vr_bswap(a.z); s[3] = vr_bswap(a.w);
    s[4] = vr_bswap(b.x); s[5] = vr_bswap(b.y); s[6] = vr_bswap(b.z); s[7] = vr_bswap(b.w);
}

// The unit digest of unit `unit` of an n-byte message at `data` (16-byte aligned) to `slot`.
// blockDim.x must be 256 (one thread per leaf of a unit).
__device__ __forceinline__ void sha256_unit_at(u32 (*node)[VR_LEAVES_PER_UNIT + 1], const u8* __restrict__ data,
                                               u64 n, u64 unit, u8* __restrict__ slot) {
    const u64 start = unit << VR_UNIT_SHIFT;
    const u64 avail = n > start ? n - start : 0;
    const u32 unit_len = avail > (1u << VR_UNIT_SHIFT) ? (1u << VR_UNIT_SHIFT) : (u32)avail;
    const u32 leaves = unit_len ? (unit_len + VR_LEAF - 1) / VR_LEAF : 1u;
    const u32 t = threadIdx.x;
    if (t < leaves) {
        u32 off = t * VR_LEAF;
        u32 len = unit_len - off < VR_LEAF ? unit_len - off : VR_LEAF;
        u32 s[8];
        sha256_leaf(data + start + off, len, s);
#pragma unroll
        for (int i = 0; i < 8; ++i) node[i][t] = s[i];
    }
    __syncthreads();
    sha256_block_reduce(node, leaves);
    if (t == 0) {
        u32 s[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] = node[i][0];
        store_digest(slot, s);
    }
}

// Unit digests of units [first_unit, first_unit + gridDim.x) of an n-byte message at `data`
// (16-byte aligned). out receives 32 bytes per unit, indexed by absolute unit number.
__device__ __forceinline__ void sha256_units_body(u32 (*node)[VR_LEAVES_PER_UNIT + 1], const u8* __restrict__ data,
                                                  u64 n, u64 first_unit, u8* __restrict__ out) {
    const u64 unit = first_unit + blockIdx.x;
    sha256_unit_at(node, data, n, unit, out + unit * 32u);
}

// Two register budgets of the same kernel: the compiler's own (77 registers, 3 blocks per SM) runs
// each block about 6% faster on an H200; 64 registers (4 blocks per SM) leaves a smaller last
// wave on some shard sizes (1 GiB: 2 waves instead of 3). The host picks per shard.
#ifndef VR_SHA_MIN_BLOCKS
#define VR_SHA_MIN_BLOCKS 1
#endif
extern "C" __global__ void __launch_bounds__(256, VR_SHA_MIN_BLOCKS)
    sha256_tree_units(const u8* __restrict__ data, u64 n, u64 first_unit, u8* __restrict__ out) {
    __shared__ u32 node[8][VR_LEAVES_PER_UNIT + 1];
    sha256_units_body(node, data, n, first_unit, out);
}

extern "C" __global__ void __launch_bounds__(256, 4)
    sha256_tree_units_occ4(const u8* __restrict__ data, u64 n, u64 first_unit, u8* __restrict__ out) {
    __shared__ u32 node[8][VR_LEAVES_PER_UNIT + 1];
    sha256_units_body(node, data, n, first_unit, out);
}

// The same for small shards, where one block per unit would leave most SMs idle and make a 1 MiB
// verify as slow as one SM: eight blocks of 32 threads per unit, each reducing 32 leaves (an
// aligned subtree) to out[8 * unit + sub]; sha256_tree_reduce with group 8 then gives the unit
// digests. Blocks past the last leaf of a short final unit write nothing.
extern "C" __global__ void __launch_bounds__(32)
    sha256_tree_units_split(const u8* __restrict__ data, u64 n, u64 first_unit, u8* __restrict__ out) {
    __shared__ u32 node[8][33];
    const u64 unit = first_unit + blockIdx.x / 8u;
    const u32 sub = blockIdx.x % 8u;
    const u64 start = unit << VR_UNIT_SHIFT;
    const u64 avail = n > start ? n - start : 0;
    const u32 unit_len = avail > (1u << VR_UNIT_SHIFT) ? (1u << VR_UNIT_SHIFT) : (u32)avail;
    const u32 leaves = unit_len ? (unit_len + VR_LEAF - 1) / VR_LEAF : 1u;
    const u32 first = sub * 32u;
    if (first >= leaves) return;  // the whole block: no barrier is skipped by part of it
    const u32 here = leaves - first < 32u ? leaves - first : 32u;
    const u32 t = threadIdx.x;
    if (t < here) {
        u32 off = (first + t) * VR_LEAF;
        u32 len = unit_len - off < VR_LEAF ? unit_len - off : VR_LEAF;
        u32 s[8];
        sha256_leaf(data + start + off, len, s);
#pragma unroll
        for (int i = 0; i < 8; ++i) node[i][t] = s[i];
    }
    __syncthreads();
    sha256_block_reduce(node, here);
    if (t == 0) {
        u32 s[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] = node[i][0];
        store_digest(out + (unit * 8u + sub) * 32u, s);
    }
}

// One level-group of the tree: block b reduces nodes [group b, group b + group) of `count`
// 32-byte nodes to one node out[b] (group: a power of two, at most blockDim.x and 256).
// Aligned power-of-two groups are exact subtrees of the spec's tree, so repeating this until one
// node is left gives the root R.
extern "C" __global__ void __launch_bounds__(256)
    sha256_tree_reduce(const u8* __restrict__ in, u32 count, u32 group, u8* __restrict__ out) {
    __shared__ u32 node[8][VR_LEAVES_PER_UNIT + 1];
    const u32 t = threadIdx.x;
    const u32 base = blockIdx.x * group;
    const u32 here = count - base < group ? count - base : group;
    if (t < here) {
        u32 s[8];
        load_digest(in + (u64)(base + t) * 32u, s);
#pragma unroll
        for (int i = 0; i < 8; ++i) node[i][t] = s[i];
    }
    __syncthreads();
    sha256_block_reduce(node, here);
    if (t == 0) {
        u32 s[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] = node[i][0];
        store_digest(out + (u64)blockIdx.x * 32u, s);
    }
}

// Segment tables (batched digests, vr_common.cuh): block b computes the unit digest described by
// table[b], in both register budgets as above; one level of every segment's tree per reduce launch.
extern "C" __global__ void __launch_bounds__(256, VR_SHA_MIN_BLOCKS)
    sha256_table_units(const vr_unit_desc* __restrict__ table) {
    __shared__ u32 node[8][VR_LEAVES_PER_UNIT + 1];
    const vr_unit_desc d = table[blockIdx.x];
    sha256_unit_at(node, reinterpret_cast<const u8*>(d.data), d.n, d.unit, reinterpret_cast<u8*>(d.cv_out));
}

extern "C" __global__ void __launch_bounds__(256, 4)
    sha256_table_units_occ4(const vr_unit_desc* __restrict__ table) {
    __shared__ u32 node[8][VR_LEAVES_PER_UNIT + 1];
    const vr_unit_desc d = table[blockIdx.x];
    sha256_unit_at(node, reinterpret_cast<const u8*>(d.data), d.n, d.unit, reinterpret_cast<u8*>(d.cv_out));
}

extern "C" __global__ void __launch_bounds__(256)
    sha256_table_reduce(const vr_reduce_desc* __restrict__ table) {
    __shared__ u32 node[8][VR_LEAVES_PER_UNIT + 1];
    const vr_reduce_desc d = table[blockIdx.x];
    const u32 t = threadIdx.x;
    if (t < d.count) {
        u32 s[8];
        load_digest(reinterpret_cast<const u8*>(d.in) + (u64)t * 32u, s);
#pragma unroll
        for (int i = 0; i < 8; ++i) node[i][t] = s[i];
    }
    __syncthreads();
    sha256_block_reduce(node, d.count);
    if (t == 0) {
        u32 s[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] = node[i][0];
        store_digest(reinterpret_cast<u8*>(d.out), s);
    }
}

// Test entry: plain SHA-256 of `count` messages (no suffix), message i being lens[i] bytes at
// data + offs[i]. It runs the same compression function as the tree kernels, so NIST's CAVP
// vectors check the device's SHA-256 core itself.
extern "C" __global__ void sha256_messages(const u8* __restrict__ data, const u64* __restrict__ offs,
                                           const u64* __restrict__ lens, u32 count,
                                           u8* __restrict__ out) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    u32 s[8];
    sha256_bytes(data + offs[i], lens[i], -1, s);
    for (int j = 0; j < 8; ++j) {
        u32 v = s[j];
        out[32u * i + 4 * j + 0] = (u8)(v >> 24);
        out[32u * i + 4 * j + 1] = (u8)(v >> 16);
        out[32u * i + 4 * j + 2] = (u8)(v >> 8);
        out[32u * i + 4 * j + 3] = (u8)v;
    }
}

#endif  // VR_NO_KERNELS
