// Shared by the kernel sources: types and single-instruction primitives, __host__ __device__ so
// that the CPU harness runs the same code. NVRTC receives this file as a named header.
#pragma once

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned char u8;

#ifndef VR_HD
#define VR_HD __host__ __device__ __forceinline__
#endif

// ---------------------------------------------------------------------------------------------
// Primitive operations: one instruction each on the device.

VR_HD u32 vr_rotr(u32 x, u32 n) {
#ifdef __CUDA_ARCH__
    return __funnelshift_r(x, x, n);
#else
    return (x >> n) | (x << (32u - n));
#endif
}

VR_HD u32 vr_bswap(u32 x) {
#ifdef __CUDA_ARCH__
    return __byte_perm(x, 0u, 0x0123u);
#else
    return __builtin_bswap32(x);
#endif
}

// Pipe balancing. Shifts, logic ops, byte permutes and IADD3 all issue to the integer ALU pipe
// (64 lanes per SM); SHA-256 needs about 1,300 of those per compression against about 100 on the
// FMA pipe, which can also do integer work as IMAD (another 64 lanes); BLAKE3 is similar. So selected operations are
// written as multiplications: a + b = a*1 + b, x >> k = mulhi(x, 2^(32-k)) and
// rotr(x, k) = x*2^(32-k) + mulhi(x, 2^(32-k)). The multipliers come from __constant__ memory
// that the host fills at module load (vr_mulc[k] = 2^k), so that the compiler cannot see them and
// turn the multiplications back into shifts.
#ifdef __CUDACC__
__constant__ u32 vr_mulc[32];
#endif

VR_HD u32 vr_addf(u32 a, u32 b) {
#ifdef __CUDA_ARCH__
    u32 r;
    asm("mad.lo.u32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(vr_mulc[0]), "r"(b));
    return r;
#else
    return a + b;
#endif
}

VR_HD u32 vr_shrf(u32 x, u32 k) {
#ifdef __CUDA_ARCH__
    u32 r;
    asm("mul.hi.u32 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(vr_mulc[32 - k]));
    return r;
#else
    return x >> k;
#endif
}

VR_HD u32 vr_rotrf(u32 x, u32 k) {
#ifdef __CUDA_ARCH__
    u32 hi, r;
    const u32 m = vr_mulc[32 - k];
    asm("mul.hi.u32 %0, %1, %2;" : "=r"(hi) : "r"(x), "r"(m));
    asm("mad.lo.u32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(m), "r"(hi));
    return r;
#else
    return (x >> k) | (x << (32u - k));
#endif
}

// ---------------------------------------------------------------------------------------------
// Tree reduction inside a thread block, shared by both digests.

#ifdef __CUDACC__
// Pair-from-the-left reduction of `count` >= 1 nodes held in shared memory as node[word][index]
// (word-major, so that neighbouring threads touch neighbouring banks). An unpaired last node moves
// up unchanged (sha256-tree-v1 spec step 4; BLAKE3's tree has the same shape). `parent(l, r, o,
// count)` combines one pair; `count` lets it tell the final compression (count == 2). Every
// thread of the block must call it. Result in node[*][0].
template <int W, class Parent>
__device__ __forceinline__ void vr_block_reduce(u32 (*node)[W], u32 count, Parent parent) {
    const u32 t = threadIdx.x;
    while (count > 1) {
        const u32 pairs = count >> 1;
        const bool active = t < pairs;
        u32 l[8], r[8], o[8];
        if (active) {
#pragma unroll
            for (int i = 0; i < 8; ++i) { l[i] = node[i][2 * t]; r[i] = node[i][2 * t + 1]; }
            parent(l, r, o, count);
        }
        // The odd node moves up: read it before anyone overwrites its slot.
        u32 odd[8];
        const bool carry = (count & 1u) && t == 0;
        if (carry) {
#pragma unroll
            for (int i = 0; i < 8; ++i) odd[i] = node[i][count - 1];
        }
        __syncthreads();
        if (active) {
#pragma unroll
            for (int i = 0; i < 8; ++i) node[i][t] = o[i];
        }
        if (carry) {
#pragma unroll
            for (int i = 0; i < 8; ++i) node[i][pairs] = odd[i];
        }
        __syncthreads();
        count = pairs + (count & 1u);
    }
}
#endif

// ---------------------------------------------------------------------------------------------
// Segment tables (batched digests): the host lays out one descriptor per unit of every segment,
// and one per reduction block of every tree level, uploads them all in one copy, and runs one
// launch per (algorithm, kernel) over them. The layouts are mirrored by numpy dtypes in
// backends/cuda/_batch.py (same field order, natural alignment, no padding).

// One unit of one segment: block b of a table launch hashes table[b].
struct vr_unit_desc {
    u64 data;      // device address of the segment's first byte (16-byte aligned)
    u64 n;         // segment length in bytes
    u64 unit;      // which 1 MiB unit of the segment
    u64 cv_out;    // device address of this unit's 32-byte value (tree node or, single unit, root)
    u64 unit_out;  // blake3: where this unit's standalone digest goes, or 0 for none
    u64 key;       // blake3: device address of a 32-byte key (keyed mode), or 0 for unkeyed
};

// One block of one tree level: reduce `count` (1..256) nodes at `in` to one node at `out`;
// `root` (blake3) sets ROOT on the final parent when this block finishes the segment's tree.
struct vr_reduce_desc {
    u64 in;
    u64 out;
    u64 key;
    u32 count;
    u32 root;
};
