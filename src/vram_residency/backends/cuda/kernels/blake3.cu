// BLAKE3 (unkeyed, 32-byte output) on the GPU: one thread block per aligned 1 MiB unit (1024
// chunks), one thread per four 1 KiB chunks (a 4 KiB subtree), the unit's 256 subtree chaining
// values reduced in shared memory. A second kernel reduces unit chaining values 256 at a time,
// the last launch setting ROOT on the final parent. BLAKE3's tree (left subtree = the largest
// power of two of chunks) has the same shape as pairing neighbours from the left with the odd
// node moving up, so aligned groups reduce independently. Small messages run blake3_units_split
// instead: one block per 128 KiB piece, one chunk per thread (see there).
//
// Two values per unit exist and differ:
//  - the unit's chaining value in the message's tree: chunk counters are the GLOBAL chunk
//    indices, no ROOT flag. Unit chaining values reduce to the message root.
//  - the unit digest (formats.tree): BLAKE3 of the unit's bytes as a message of its own, so chunk
//    counters start at 0 and the top compression carries ROOT. For unit 0 only the top differs;
//    for every later unit the whole chunk layer differs (the counter enters every compression),
//    so producing unit digests costs a second pass over the chunk layer of units >= 1. The
//    message digest alone (verify) needs one pass.
//
// Compiled at run time by NVRTC; the core is __host__ __device__ for the CPU harness.

#include "vr_common.cuh"

#define B3_CHUNK_START 1u
#define B3_CHUNK_END 2u
#define B3_PARENT 4u
#define B3_ROOT 8u

#define B3_IV0 0x6A09E667u
#define B3_IV1 0xBB67AE85u
#define B3_IV2 0x3C6EF372u
#define B3_IV3 0xA54FF53Au
#define B3_IV4 0x510E527Fu
#define B3_IV5 0x9B05688Cu
#define B3_IV6 0x1F83D9ABu
#define B3_IV7 0x5BE0CD19u

// Rotations: 16 and 8 are byte permutes (one PRMT), 12 and 7 funnel shifts (one SHF).
VR_HD u32 b3_rotr16(u32 x) {
#ifdef __CUDA_ARCH__
    return __byte_perm(x, 0u, 0x1032u);
#else
    return (x >> 16) | (x << 16);
#endif
}
VR_HD u32 b3_rotr8(u32 x) {
#ifdef __CUDA_ARCH__
    return __byte_perm(x, 0u, 0x0321u);
#else
    return (x >> 8) | (x << 24);
#endif
}

// Which operations go to the FMA pipe (vr_common.cuh explains why; chosen by measurement):
//   0: none (the compiler balances on its own)
//   1: every addition
//   2: 1, plus the 16-bit rotation of the four column G functions
#ifndef VR_B3_VARIANT
#define VR_B3_VARIANT 1
#endif

template <int V> VR_HD u32 b3_add(u32 a, u32 b) {
    if constexpr (V >= 1) return vr_addf(a, b); else return a + b;
}
template <int V, bool COL> VR_HD u32 b3_rot16(u32 x) {
    if constexpr (V >= 2 && COL) return vr_rotrf(x, 16); else return b3_rotr16(x);
}

#define B3_G(a, b, c, d, mx, my, col)                                                            \
    do {                                                                                         \
        a = b3_add<V>(a, b3_add<V>(b, (mx)));                                                    \
        d = b3_rot16<V, col>(d ^ a);                                                             \
        c = b3_add<V>(c, d);                                                                     \
        b = vr_rotr(b ^ c, 12);                                                                  \
        a = b3_add<V>(a, b3_add<V>(b, (my)));                                                    \
        d = b3_rotr8(d ^ a);                                                                     \
        c = b3_add<V>(c, d);                                                                     \
        b = vr_rotr(b ^ c, 7);                                                                   \
    } while (0)

#define B3_ROUND(m)                                                                              \
    B3_G(v0, v4, v8, v12, m[0], m[1], true);                                                     \
    B3_G(v1, v5, v9, v13, m[2], m[3], true);                                                     \
    B3_G(v2, v6, v10, v14, m[4], m[5], true);                                                    \
    B3_G(v3, v7, v11, v15, m[6], m[7], true);                                                    \
    B3_G(v0, v5, v10, v15, m[8], m[9], false);                                                   \
    B3_G(v1, v6, v11, v12, m[10], m[11], false);                                                 \
    B3_G(v2, v7, v8, v13, m[12], m[13], false);                                                  \
    B3_G(v3, v4, v9, v14, m[14], m[15], false)

// Message permutation between rounds: new m[i] = old m[P[i]] with
// P = {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8}. In unrolled code it is renaming only.
#define B3_PERMUTE(m)                                                                            \
    do {                                                                                         \
        u32 p0 = m[2], p1 = m[6], p2 = m[3], p3 = m[10], p4 = m[7], p5 = m[0], p6 = m[4],        \
            p7 = m[13], p8 = m[1], p9 = m[11], p10 = m[12], p11 = m[5], p12 = m[9], p13 = m[14], \
            p14 = m[15], p15 = m[8];                                                             \
        m[0] = p0; m[1] = p1; m[2] = p2; m[3] = p3; m[4] = p4; m[5] = p5; m[6] = p6; m[7] = p7;  \
        m[8] = p8; m[9] = p9; m[10] = p10; m[11] = p11; m[12] = p12; m[13] = p13; m[14] = p14;   \
        m[15] = p15;                                                                             \
    } while (0)

// The compression function, first 8 output words only (chaining value, or the 32-byte root
// output when flags hold ROOT). cv and out may alias. m is clobbered (permuted).
template <int V>
VR_HD void b3_compress_v(const u32 cv[8], u32 m[16], u64 counter, u32 block_len, u32 flags, u32 out[8]) {
    u32 v0 = cv[0], v1 = cv[1], v2 = cv[2], v3 = cv[3], v4 = cv[4], v5 = cv[5], v6 = cv[6], v7 = cv[7];
    u32 v8 = B3_IV0, v9 = B3_IV1, v10 = B3_IV2, v11 = B3_IV3;
    u32 v12 = (u32)counter, v13 = (u32)(counter >> 32), v14 = block_len, v15 = flags;
    B3_ROUND(m); B3_PERMUTE(m);
    B3_ROUND(m); B3_PERMUTE(m);
    B3_ROUND(m); B3_PERMUTE(m);
    B3_ROUND(m); B3_PERMUTE(m);
    B3_ROUND(m); B3_PERMUTE(m);
    B3_ROUND(m); B3_PERMUTE(m);
    B3_ROUND(m);
    out[0] = v0 ^ v8; out[1] = v1 ^ v9; out[2] = v2 ^ v10; out[3] = v3 ^ v11;
    out[4] = v4 ^ v12; out[5] = v5 ^ v13; out[6] = v6 ^ v14; out[7] = v7 ^ v15;
}

VR_HD void b3_compress(const u32 cv[8], u32 m[16], u64 counter, u32 block_len, u32 flags, u32 out[8]) {
    b3_compress_v<VR_B3_VARIANT>(cv, m, counter, block_len, flags, out);
}

VR_HD void b3_iv(u32 cv[8]) {
    cv[0] = B3_IV0; cv[1] = B3_IV1; cv[2] = B3_IV2; cv[3] = B3_IV3;
    cv[4] = B3_IV4; cv[5] = B3_IV5; cv[6] = B3_IV6; cv[7] = B3_IV7;
}

#define B3_KEYED_HASH 16u

// Key policies: what a chunk's and a parent's compression start from, and the mode flag ORed into
// every compression. Unkeyed hashing starts from the IV (immediates, so the tuned kernels compile
// exactly as before); keyed mode (the attest-v1 probe) starts from the 32-byte key read as eight
// little-endian words and sets KEYED_HASH on every compression, chunks and parents alike
// (BLAKE3 spec, section 2.3 "Modes"). The compression's own v8..v11 stay the IV in both modes.
struct b3_plain_key {
    VR_HD void load(u32 cv[8]) const { b3_iv(cv); }
    VR_HD u32 flags() const { return 0u; }
};
// Runtime key: `w` points at eight key words (shared memory in the table kernels, host memory in
// the CPU harness); `f` is B3_KEYED_HASH, or 0 with w holding the IV (unkeyed segments of a table).
struct b3_rt_key {
    const u32* w;
    u32 f;
    VR_HD void load(u32 cv[8]) const {
        for (int i = 0; i < 8; ++i) cv[i] = w[i];
    }
    VR_HD u32 flags() const { return f; }
};

// Parent node: compress(IV or key, left || right, counter 0, 64 bytes, PARENT | extra | mode).
template <class K = b3_plain_key>
VR_HD void b3_parent(const u32 l[8], const u32 r[8], u32 extra, u32 out[8], const K& key = K()) {
    u32 m[16];
    for (int i = 0; i < 8; ++i) { m[i] = l[i]; m[8 + i] = r[i]; }
    u32 kcv[8];
    key.load(kcv);
    b3_compress(kcv, m, 0, 64, B3_PARENT | extra | key.flags(), out);
}

// Chaining value (or root output, with extra = ROOT) of one chunk of `len` <= 1024 bytes at p, any
// alignment, byte loads. The general path: partial chunks, roots, the CPU harness.
template <class K = b3_plain_key>
VR_HD void b3_chunk_bytes(const u8* p, u32 len, u64 counter, u32 extra, u32 cv[8], const K& key = K()) {
    key.load(cv);
    u32 blocks = len ? (len + 63) / 64 : 1u;
    for (u32 blk = 0; blk < blocks; ++blk) {
        u32 blen = len - blk * 64 < 64 ? len - blk * 64 : 64u;
        u8 buf[64];
        for (u32 i = 0; i < 64; ++i) buf[i] = i < blen ? p[blk * 64 + i] : (u8)0;
        u32 m[16];
        for (int i = 0; i < 16; ++i)
            m[i] = (u32)buf[4 * i] | ((u32)buf[4 * i + 1] << 8) | ((u32)buf[4 * i + 2] << 16) |
                   ((u32)buf[4 * i + 3] << 24);
        u32 flags = (blk == 0 ? B3_CHUNK_START : 0u) | (blk + 1 == blocks ? (B3_CHUNK_END | extra) : 0u);
        b3_compress(cv, m, counter, blen, flags | key.flags(), cv);
    }
}

// blake3_units_split's piece: 2^17 bytes = 128 chunks, one per thread (outside the kernel guard:
// the CPU harness emulates the split with the same sizes).
#define B3_SPLIT_SHIFT 17
#define B3_SPLIT_CHUNKS 128u

// ---------------------------------------------------------------------------------------------
// Device-only fast paths and kernels.
// The CPU harness defines VR_NO_KERNELS and includes this file for the __host__ __device__ core.
#ifndef VR_NO_KERNELS

#ifndef VR_B3_PREFETCH
#define VR_B3_PREFETCH 1
#endif

#define B3_UNIT_SHIFT 20
#define B3_CHUNKS_PER_UNIT 1024u
#define B3_CPT 4u
#define B3_THREADS 256u

// One full chunk (1024 bytes, 16-byte aligned, no ROOT) under P different chunk counters, loading
// each 64-byte block once. P = 2 computes a unit's message-tree CV and its standalone CV together.
template <int P, class K>
__device__ __forceinline__ void b3_chunk_full(const uint4* __restrict__ p, const u64 (&counter)[P],
                                              u32 (&cv)[P][8], const K& key) {
#pragma unroll
    for (int k = 0; k < P; ++k) key.load(cv[k]);
#if VR_B3_PREFETCH
    uint4 q0 = __ldg(p + 0), q1 = __ldg(p + 1), q2 = __ldg(p + 2), q3 = __ldg(p + 3);
#endif
#pragma unroll 1
    for (u32 blk = 0; blk < 16; ++blk) {
#if VR_B3_PREFETCH
        // The next block's loads are issued before this block's rounds (16 more registers).
        u32 m0[16] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w,
                      q2.x, q2.y, q2.z, q2.w, q3.x, q3.y, q3.z, q3.w};
        if (blk + 1 < 16) {
            const uint4* nx = p + 4 * (blk + 1);
            q0 = __ldg(nx + 0); q1 = __ldg(nx + 1); q2 = __ldg(nx + 2); q3 = __ldg(nx + 3);
        }
#else
        const uint4* cur = p + 4 * blk;
        uint4 q0 = __ldg(cur + 0), q1 = __ldg(cur + 1), q2 = __ldg(cur + 2), q3 = __ldg(cur + 3);
        u32 m0[16] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w,
                      q2.x, q2.y, q2.z, q2.w, q3.x, q3.y, q3.z, q3.w};
#endif
        u32 flags = (blk == 0 ? B3_CHUNK_START : 0u) | (blk == 15 ? B3_CHUNK_END : 0u) | key.flags();
#pragma unroll
        for (int k = 0; k < P; ++k) {
            u32 m[16];
#pragma unroll
            for (int i = 0; i < 16; ++i) m[i] = m0[i];
            b3_compress(cv[k], m, counter[k], 64, flags, cv[k]);
        }
    }
}

// The node of thread t's CPT-chunk subtree (CPT: 4, or 1 in blake3_units_split; at most 4) under P
// counter bases. root[k] (ROOT or 0) is applied to the compression that is the top of the unit's
// tree, when that compression happens inside this thread (the unit has at most CPT chunks).
template <int P, class K = b3_plain_key, u32 CPT = B3_CPT>
__device__ __forceinline__ void b3_thread_node(const u8* __restrict__ unit_ptr, u32 unit_len, u32 c_u,
                                               u32 t, const u64 (&base)[P], const u32 (&root)[P],
                                               u32 (&node)[P][8], const K& key = K()) {
    static_assert(CPT == 1 || CPT == 2 || CPT == 4, "the merge below pairs at most four chunks");
    const u32 first = t * CPT;
    const u32 nch = c_u - first < CPT ? c_u - first : CPT;
    const bool top_here = c_u <= CPT;
    u32 p01[P][8];
    u32 cur[P][8];
    for (u32 j = 0; j < nch; ++j) {
        const u32 ci = first + j;
        const u32 off = ci * 1024u;
        const u32 len = unit_len - off < 1024u ? unit_len - off : 1024u;
        if (len == 1024u && c_u > 1) {
            u64 ctr[P];
#pragma unroll
            for (int k = 0; k < P; ++k) ctr[k] = base[k] + ci;
            b3_chunk_full<P>(reinterpret_cast<const uint4*>(unit_ptr + off), ctr, cur, key);
        } else {
#pragma unroll
            for (int k = 0; k < P; ++k)
                b3_chunk_bytes(unit_ptr + off, len, base[k] + ci, c_u == 1 ? root[k] : 0u, cur[k], key);
        }
        // Merge as soon as a pair is complete, left to right.
        const bool last = j + 1 == nch;
#pragma unroll
        for (int k = 0; k < P; ++k) {
            const u32 top = (top_here && last) ? root[k] : 0u;
            if (j == 0) {
#pragma unroll
                for (int i = 0; i < 8; ++i) node[k][i] = cur[k][i];
            } else if (j == 1) {
                b3_parent(node[k], cur[k], top, p01[k], key);
#pragma unroll
                for (int i = 0; i < 8; ++i) node[k][i] = p01[k][i];
            } else if (j == 2) {
                if (last) {
                    b3_parent(p01[k], cur[k], top, node[k], key);
                } else {
#pragma unroll
                    for (int i = 0; i < 8; ++i) node[k][i] = cur[k][i];  // c2, waiting for c3
                }
            } else {
                u32 p23[8];
                b3_parent(node[k], cur[k], 0u, p23, key);
                b3_parent(p01[k], p23, top, node[k], key);
            }
        }
    }
}

// vr_block_reduce with BLAKE3's parent node: the final compression (count == 2) gets `top` (ROOT
// or 0). With dual, that thread also writes the top computed with ROOT to root_out (unit 0 in
// unit-digest mode: same tree, two flags). W: the node array's row width (block size + 1).
template <int W, class K = b3_plain_key>
__device__ __forceinline__ void b3_block_reduce(u32 (*node)[W], u32 count, u32 top, bool dual,
                                                u32 root_out[8], const K& key = K()) {
    vr_block_reduce(node, count, [=](u32 l[8], u32 r[8], u32 o[8], u32 n) {
        b3_parent(l, r, n == 2 ? top : 0u, o, key);
        if (dual && n == 2) b3_parent(l, r, B3_ROOT, root_out, key);
    });
}

__device__ __forceinline__ void b3_store(u8* __restrict__ out, const u32 s[8]) {
    uint4* o = reinterpret_cast<uint4*>(out);
    o[0] = make_uint4(s[0], s[1], s[2], s[3]);
    o[1] = make_uint4(s[4], s[5], s[6], s[7]);
}

// Units [first_unit, first_unit + gridDim.x) of an n-byte message at `data` (16-byte aligned), one
// pass over the chunk layer with the message tree's counters.
// cv_out[u]: the unit's chaining value in the message tree, or the message digest itself when the
// message is a single unit (n <= 1 MiB). If unit_out is not null, unit_out[u] receives the unit
// digest where this pass yields it too: for unit 0 (its standalone counters are the tree's; only
// the top compression differs) and for a single-unit message (where it is the digest).
// Minimum resident blocks per SM, i.e. a register cap: 4 (64 registers, spills outside the hot
// loop only) measured fastest on an H200.
#ifndef VR_B3_MIN_BLOCKS
#define VR_B3_MIN_BLOCKS 4
#endif
extern "C" __global__ void __launch_bounds__(B3_THREADS, VR_B3_MIN_BLOCKS)
    blake3_units(const u8* __restrict__ data, u64 n, u64 first_unit, u8* __restrict__ cv_out,
                 u8* __restrict__ unit_out) {
    __shared__ u32 nodeA[8][B3_THREADS + 1];
    const u64 unit = first_unit + blockIdx.x;
    const u64 start = unit << B3_UNIT_SHIFT;
    const u64 avail = n > start ? n - start : 0;
    const u32 unit_len = avail > (1u << B3_UNIT_SHIFT) ? (1u << B3_UNIT_SHIFT) : (u32)avail;
    const u32 c_u = unit_len ? (unit_len + 1023u) / 1024u : 1u;
    const u32 count = (c_u + B3_CPT - 1) / B3_CPT;
    const bool single = n <= (1ull << B3_UNIT_SHIFT);
    const bool dual_top = unit_out != nullptr && !single && unit == 0;
    const u32 t = threadIdx.x;
    const u64 base[1] = {unit * B3_CHUNKS_PER_UNIT};
    const u32 root[1] = {single ? B3_ROOT : 0u};
    if (t < count) {
        u32 node[1][8];
        b3_thread_node<1>(data + start, unit_len, c_u, t, base, root, node);
#pragma unroll
        for (int i = 0; i < 8; ++i) nodeA[i][t] = node[0][i];
    }
    __syncthreads();
    u32 root_out[8];
    b3_block_reduce(nodeA, count, root[0], dual_top, root_out);
    if (t == 0) {
        u32 s[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] = nodeA[i][0];
        b3_store(cv_out + unit * 32u, s);
        if (dual_top) b3_store(unit_out + unit * 32u, root_out);
        else if (unit_out != nullptr && single) b3_store(unit_out + unit * 32u, s);
    }
}

// Units >= 1 of a message of more than one unit, when unit digests are wanted: the chunk layer
// under two sets of counters at once (the tree's and the unit's own, from 0), each 64-byte block
// loaded once. cv_out[u] as above; unit_out[u] = BLAKE3 of the unit's bytes alone.
extern "C" __global__ void __launch_bounds__(B3_THREADS)
    blake3_units_standalone(const u8* __restrict__ data, u64 n, u64 first_unit, u8* __restrict__ cv_out,
                            u8* __restrict__ unit_out) {
    __shared__ u32 nodeA[8][B3_THREADS + 1];
    __shared__ u32 nodeB[8][B3_THREADS + 1];
    const u64 unit = first_unit + blockIdx.x;
    const u64 start = unit << B3_UNIT_SHIFT;
    const u64 avail = n > start ? n - start : 0;
    const u32 unit_len = avail > (1u << B3_UNIT_SHIFT) ? (1u << B3_UNIT_SHIFT) : (u32)avail;
    const u32 c_u = unit_len ? (unit_len + 1023u) / 1024u : 1u;
    const u32 count = (c_u + B3_CPT - 1) / B3_CPT;
    const u32 t = threadIdx.x;
    const u64 base[2] = {unit * B3_CHUNKS_PER_UNIT, 0ull};
    const u32 root[2] = {0u, B3_ROOT};
    if (t < count) {
        u32 node[2][8];
        b3_thread_node<2>(data + start, unit_len, c_u, t, base, root, node);
#pragma unroll
        for (int i = 0; i < 8; ++i) { nodeA[i][t] = node[0][i]; nodeB[i][t] = node[1][i]; }
    }
    __syncthreads();
    u32 unused[8];
    b3_block_reduce(nodeA, count, 0u, false, unused);
    b3_block_reduce(nodeB, count, B3_ROOT, false, unused);
    if (t == 0) {
        u32 a[8], b[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) { a[i] = nodeA[i][0]; b[i] = nodeB[i][0]; }
        b3_store(cv_out + unit * 32u, a);
        b3_store(unit_out + unit * 32u, b);
    }
}

// Small messages (verify of a shard of a few units, or the digest of a one-unit shard): one block
// per aligned 128-chunk (128 KiB) piece, ONE chunk per thread, instead of one block per 1 MiB unit
// with four chunks per thread in series. A 1 MiB message then runs on eight SMs with a quarter of
// the serial work per thread, rather than on one SM.
//
// BLAKE3's tree is left-complete (the left subtree of every parent holds the largest power of two
// of chunks less than the total), so every aligned run of 128 full chunks is a subtree of the
// message's tree, and the last piece (possibly partial) is the right-most subtree of what is left.
// Chunk counters are the GLOBAL chunk indices and no ROOT is set, unless the message is a single
// piece (n <= 128 KiB): then the piece's top compression is the message's top, gets ROOT, and
// cv_out[piece 0] is the digest. Otherwise the pieces' chaining values reduce to the root with
// blake3_reduce exactly as unit values do (pairs from the left, the odd node moving up, groups of
// 256: aligned power-of-two groups, so subtrees again).
//
// Pieces [first_piece, first_piece + gridDim.x) of an n-byte message at `data` (16-byte aligned);
// cv_out[p] receives piece p's 32-byte value. 128 threads per block (B3_SPLIT_CHUNKS).
extern "C" __global__ void __launch_bounds__(B3_SPLIT_CHUNKS)
    blake3_units_split(const u8* __restrict__ data, u64 n, u64 first_piece, u8* __restrict__ cv_out) {
    __shared__ u32 node[8][B3_SPLIT_CHUNKS + 1];
    const u64 piece = first_piece + blockIdx.x;
    const u64 start = piece << B3_SPLIT_SHIFT;
    const u64 avail = n > start ? n - start : 0;
    const u32 piece_len = avail > (1u << B3_SPLIT_SHIFT) ? (1u << B3_SPLIT_SHIFT) : (u32)avail;
    // Chunks in this piece; an empty message is one empty chunk.
    const u32 c_p = piece_len ? (piece_len + 1023u) / 1024u : 1u;
    const bool single = n <= (1ull << B3_SPLIT_SHIFT);
    const u32 t = threadIdx.x;
    const u64 base[1] = {piece * B3_SPLIT_CHUNKS};
    const u32 root[1] = {single ? B3_ROOT : 0u};
    if (t < c_p) {
        // One chunk (CPT = 1): a lone chunk of a single-piece message is the whole message and
        // takes ROOT itself (b3_thread_node: c_u == 1).
        u32 cv[1][8];
        b3_thread_node<1, b3_plain_key, 1u>(data + start, piece_len, c_p, t, base, root, cv);
#pragma unroll
        for (int i = 0; i < 8; ++i) node[i][t] = cv[0][i];
    }
    __syncthreads();
    u32 unused[8];
    b3_block_reduce(node, c_p, root[0], false, unused);
    if (t == 0) {
        u32 s[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] = node[i][0];
        b3_store(cv_out + piece * 32u, s);
    }
}

// Block b reduces chaining values [256 b, 256 b + 256) of `count` to out[b]; with root set (the
// last launch, one block, count >= 2) the final parent carries ROOT and out[0] is the digest.
extern "C" __global__ void __launch_bounds__(B3_THREADS)
    blake3_reduce(const u8* __restrict__ in, u32 count, u32 root, u8* __restrict__ out) {
    __shared__ u32 node[8][B3_THREADS + 1];
    const u32 t = threadIdx.x;
    const u32 base = blockIdx.x * B3_THREADS;
    const u32 here = count - base < B3_THREADS ? count - base : B3_THREADS;
    if (t < here) {
        const uint4* q = reinterpret_cast<const uint4*>(in + (u64)(base + t) * 32u);
        uint4 a = q[0], b = q[1];
        node[0][t] = a.x; node[1][t] = a.y; node[2][t] = a.z; node[3][t] = a.w;
        node[4][t] = b.x; node[5][t] = b.y; node[6][t] = b.z; node[7][t] = b.w;
    }
    __syncthreads();
    u32 unused[8];
    b3_block_reduce(node, here, root ? B3_ROOT : 0u, false, unused);
    if (t == 0) {
        u32 s[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] = node[i][0];
        b3_store(out + (u64)blockIdx.x * 32u, s);
    }
}

// ---------------------------------------------------------------------------------------------
// Segment-table kernels (batched digests, keyed mode): the same unit and reduction work as above,
// but block b takes its segment, unit, outputs and key from table[b], so one launch covers every
// unit of every segment of a verify (vr_common.cuh). Unkeyed segments run with the IV as the
// "key" and no mode flag, which is exactly the plain computation.

// Block-wide: the segment's key words (or the IV) and mode flag into shared memory.
__device__ __forceinline__ b3_rt_key b3_table_key(u64 key_addr, u32 (&kw)[9]) {
    const u32 t = threadIdx.x;
    if (t < 8) {
        u32 iv[8];
        b3_iv(iv);
        u32 v = iv[0];
#pragma unroll
        for (int i = 1; i < 8; ++i) v = (u32)i == t ? iv[i] : v;
        kw[t] = key_addr ? reinterpret_cast<const u32*>(key_addr)[t] : v;
    } else if (t == 8) {
        kw[8] = key_addr ? B3_KEYED_HASH : 0u;
    }
    __syncthreads();
    return b3_rt_key{kw, kw[8]};
}

// One unit per block, one pass with the message tree's counters (see blake3_units): the unit's
// tree value to cv_out, and where unit_out is set, unit 0's standalone digest (dual top) too.
// Single-unit segments get ROOT and their digest in cv_out.
extern "C" __global__ void __launch_bounds__(B3_THREADS, VR_B3_MIN_BLOCKS)
    blake3_table_units(const vr_unit_desc* __restrict__ table) {
    __shared__ u32 nodeA[8][B3_THREADS + 1];
    __shared__ u32 kw[9];
    const vr_unit_desc d = table[blockIdx.x];
    const b3_rt_key key = b3_table_key(d.key, kw);
    const u8* data = reinterpret_cast<const u8*>(d.data);
    const u64 start = d.unit << B3_UNIT_SHIFT;
    const u64 avail = d.n > start ? d.n - start : 0;
    const u32 unit_len = avail > (1u << B3_UNIT_SHIFT) ? (1u << B3_UNIT_SHIFT) : (u32)avail;
    const u32 c_u = unit_len ? (unit_len + 1023u) / 1024u : 1u;
    const u32 count = (c_u + B3_CPT - 1) / B3_CPT;
    const bool single = d.n <= (1ull << B3_UNIT_SHIFT);
    const bool dual_top = d.unit_out != 0 && !single && d.unit == 0;
    const u32 t = threadIdx.x;
    const u64 base[1] = {d.unit * B3_CHUNKS_PER_UNIT};
    const u32 root[1] = {single ? B3_ROOT : 0u};
    if (t < count) {
        u32 node[1][8];
        b3_thread_node<1>(data + start, unit_len, c_u, t, base, root, node, key);
#pragma unroll
        for (int i = 0; i < 8; ++i) nodeA[i][t] = node[0][i];
    }
    __syncthreads();
    u32 root_out[8];
    b3_block_reduce(nodeA, count, root[0], dual_top, root_out, key);
    if (t == 0) {
        u32 s[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] = nodeA[i][0];
        b3_store(reinterpret_cast<u8*>(d.cv_out), s);
        if (dual_top) b3_store(reinterpret_cast<u8*>(d.unit_out), root_out);
    }
}

// Units >= 1 of multi-unit segments when unit digests are wanted (see blake3_units_standalone):
// the tree value to cv_out and the unit's own digest (counters from 0, ROOT) to unit_out.
extern "C" __global__ void __launch_bounds__(B3_THREADS)
    blake3_table_units_standalone(const vr_unit_desc* __restrict__ table) {
    __shared__ u32 nodeA[8][B3_THREADS + 1];
    __shared__ u32 nodeB[8][B3_THREADS + 1];
    __shared__ u32 kw[9];
    const vr_unit_desc d = table[blockIdx.x];
    const b3_rt_key key = b3_table_key(d.key, kw);
    const u8* data = reinterpret_cast<const u8*>(d.data);
    const u64 start = d.unit << B3_UNIT_SHIFT;
    const u64 avail = d.n > start ? d.n - start : 0;
    const u32 unit_len = avail > (1u << B3_UNIT_SHIFT) ? (1u << B3_UNIT_SHIFT) : (u32)avail;
    const u32 c_u = unit_len ? (unit_len + 1023u) / 1024u : 1u;
    const u32 count = (c_u + B3_CPT - 1) / B3_CPT;
    const u32 t = threadIdx.x;
    const u64 base[2] = {d.unit * B3_CHUNKS_PER_UNIT, 0ull};
    const u32 root[2] = {0u, B3_ROOT};
    if (t < count) {
        u32 node[2][8];
        b3_thread_node<2>(data + start, unit_len, c_u, t, base, root, node, key);
#pragma unroll
        for (int i = 0; i < 8; ++i) { nodeA[i][t] = node[0][i]; nodeB[i][t] = node[1][i]; }
    }
    __syncthreads();
    u32 unused[8];
    b3_block_reduce(nodeA, count, 0u, false, unused, key);
    b3_block_reduce(nodeB, count, B3_ROOT, false, unused, key);
    if (t == 0) {
        u32 a[8], b[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) { a[i] = nodeA[i][0]; b[i] = nodeB[i][0]; }
        b3_store(reinterpret_cast<u8*>(d.cv_out), a);
        b3_store(reinterpret_cast<u8*>(d.unit_out), b);
    }
}

// One tree level of every segment in one launch: block b reduces table[b].count chaining values.
extern "C" __global__ void __launch_bounds__(B3_THREADS)
    blake3_table_reduce(const vr_reduce_desc* __restrict__ table) {
    __shared__ u32 node[8][B3_THREADS + 1];
    __shared__ u32 kw[9];
    const vr_reduce_desc d = table[blockIdx.x];
    const b3_rt_key key = b3_table_key(d.key, kw);
    const u32 t = threadIdx.x;
    if (t < d.count) {
        const uint4* q = reinterpret_cast<const uint4*>(d.in + (u64)t * 32u);
        uint4 a = q[0], b = q[1];
        node[0][t] = a.x; node[1][t] = a.y; node[2][t] = a.z; node[3][t] = a.w;
        node[4][t] = b.x; node[5][t] = b.y; node[6][t] = b.z; node[7][t] = b.w;
    }
    __syncthreads();
    u32 unused[8];
    b3_block_reduce(node, d.count, d.root ? B3_ROOT : 0u, false, unused, key);
    if (t == 0) {
        u32 s[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i] = node[i][0];
        b3_store(reinterpret_cast<u8*>(d.out), s);
    }
}

#endif  // VR_NO_KERNELS
