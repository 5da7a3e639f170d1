// CPU harness for nh_fast.cu's __host__ __device__ cores: built by nvcc as host code, it runs the
// kernels' own per-lane load, key and NH functions for all 32 lanes of a warp and adds the lane
// sums (what the kernel's warp reduction does), and composes the unit digests from the same
// BLAKE3 chunk/parent functions (all chunks, then nhf_b3_reduce: the tree nhf_units builds).
// tests/backends/cuda/test_nh_fast_harness.py compares the output with the pure-Python reference.
//
//   nhf_harness tags NHKEY DATA   -> the leaf tags, hex, one line
//   nhf_harness units UNITKEY TAGS -> the unit digests, hex, one line
//   nhf_harness unitsfused UNITKEY TAGS -> the same, in nhf_leaf_tags_units' order: one lane per
//                                     chunk (nhf_b3_chunk_t<true>, the L2 block loads), then the
//                                     parents level by level, one lane per node (nhf_level_node)
//   nhf_harness top TOPKEY UNITS N -> the digest of the unit digests UNITS and length N, in
//                                     nhf_finalize's order (chunks, then the tree level by level)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define VR_NO_KERNELS 1
#include "../../../src/vram_residency/backends/cuda/kernels/nh_fast.cu"
#include "harness_io.h"

int main(int argc, char** argv) {
    if (argc != 4 && !(argc == 5 && !std::strcmp(argv[1], "top"))) {
        std::fprintf(stderr, "usage: %s tags NHKEY DATA | units UNITKEY TAGS | top TOPKEY UNITS N\n", argv[0]);
        return 2;
    }
    std::vector<u8> key = slurp(argv[2]);
    std::vector<u8> data = slurp(argv[3]);
    const u64 n = data.size();
    if (!std::strcmp(argv[1], "tags")) {
        if (key.size() != 5120) return 3;
        const u64 leaves = n == 0 ? 1 : (n + NHF_LEAF - 1) / NHF_LEAF;
        for (u64 leaf = 0; leaf < leaves; ++leaf) {
            u64 tag[NHF_T] = {0, 0, 0};
            const u64 off = leaf * NHF_LEAF;
            for (u32 lane = 0; lane < 32; ++lane) {
                nhf_vec kc[NHF_KCHUNKS], d[NHF_ITERS];
                nhf_key_chunks(key.data(), lane, kc);
                nhf_lane_load(data.data() + off, n > off ? n - off : 0, lane, d);
                u64 acc[NHF_T] = {0, 0, 0};
                nhf_lane_accumulate(d, kc, acc);
                for (int t = 0; t < NHF_T; ++t) tag[t] += acc[t];
            }
            hex(reinterpret_cast<const u8*>(tag), sizeof tag);  // little-endian host
        }
    } else if (!std::strcmp(argv[1], "units")) {
        if (key.size() != 32 || n % NHF_TAG) return 3;
        u32 k[8];
        std::memcpy(k, key.data(), 32);
        const u64 leaves = n / NHF_TAG;
        for (u64 first = 0; first < leaves; first += NHF_LEAVES_PER_UNIT) {
            const u64 count = leaves - first < NHF_LEAVES_PER_UNIT ? leaves - first : NHF_LEAVES_PER_UNIT;
            const u32 len = (u32)(count * NHF_TAG);
            const u32 chunks = (len + 1023u) / 1024u;
            u32 cvs[8][8], root[8];
            for (u32 c = 0; c < chunks; ++c) {
                const u32 clen = c + 1u < chunks ? 1024u : len - 1024u * c;
                nhf_b3_chunk(data.data() + first * NHF_TAG + 1024u * c, clen, c, k, chunks == 1u, cvs[c]);
            }
            if (chunks == 1u) std::memcpy(root, cvs[0], 32);
            else nhf_b3_reduce(cvs, chunks, k, root);
            hex(reinterpret_cast<const u8*>(root), 32);
        }
    } else if (!std::strcmp(argv[1], "unitsfused")) {
        if (key.size() != 32 || n % NHF_TAG) return 3;
        u32 k[8];
        std::memcpy(k, key.data(), 32);
        const u64 leaves = n / NHF_TAG;
        for (u64 first = 0; first < leaves; first += NHF_LEAVES_PER_UNIT) {
            const u64 count = leaves - first < NHF_LEAVES_PER_UNIT ? leaves - first : NHF_LEAVES_PER_UNIT;
            const u32 len = (u32)(count * NHF_TAG);
            const u32 chunks = (len + 1023u) / 1024u;
            u32 node[32][8] = {};  // node[lane]: the warp's registers
            for (u32 lane = 0; lane < chunks; ++lane) {
                const u32 clen = lane + 1u < chunks ? 1024u : len - 1024u * lane;
                nhf_b3_chunk_t<true>(data.data() + first * NHF_TAG + 1024u * lane, clen, lane, k, chunks == 1u, node[lane]);
            }
            for (u32 c = chunks; c > 1u; c = (c >> 1) + (c & 1u)) {
                u32 next[32][8];
                for (u32 lane = 0; lane < 32; ++lane) {  // the shuffles: every lane reads 2 lane, 2 lane + 1
                    u32 l[8], r[8];
                    std::memcpy(l, node[(2u * lane) & 31u], 32);
                    std::memcpy(r, node[(2u * lane + 1u) & 31u], 32);
                    std::memcpy(next[lane], node[lane], 32);
                    if (lane < (c >> 1) + (c & 1u)) nhf_level_node(l, r, c, lane, k, next[lane]);
                }
                std::memcpy(node, next, sizeof node);
            }
            hex(reinterpret_cast<const u8*>(node[0]), 32);
        }
    } else if (!std::strcmp(argv[1], "top")) {
        if (key.size() != 32 || n % 32 || n == 0) return 3;
        u32 k[8];
        std::memcpy(k, key.data(), 32);
        const u64 units = n / 32;
        std::vector<u8> msg(data.begin(), data.begin() + n);
        const u64 total = std::strtoull(argv[4], nullptr, 10);
        for (int i = 0; i < 8; ++i) msg.push_back((u8)(total >> (8 * i)));
        const u64 len = 32 * units + 8, chunks = (len + 1023) / 1024;
        u32 out[8];
        if (chunks == 1) {
            nhf_b3_chunk(msg.data(), (u32)len, 0, k, true, out);
        } else {
            std::vector<u32> a(8 * chunks), b(8 * chunks);
            for (u64 c = 0; c < chunks; ++c) {
                const u32 clen = c + 1 < chunks ? 1024u : (u32)(len - 1024 * c);
                nhf_b3_chunk(msg.data() + 1024 * c, clen, c, k, false, &a[8 * c]);
            }
            for (u64 count = chunks; count > 1; count = (count >> 1) + (count & 1)) {
                for (u64 i = 0; i < (count >> 1) + (count & 1); ++i) nhf_top_level_node(a.data(), count, i, k, b.data());
                a.swap(b);
            }
            std::memcpy(out, a.data(), 32);
        }
        hex(reinterpret_cast<const u8*>(out), 32);
    } else {
        return 2;
    }
    std::printf("\n");
    return 0;
}
