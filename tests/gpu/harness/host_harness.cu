// CPU harness for the kernels' __host__ __device__ cores: built by nvcc as host code, it runs the
// same SHA-256 and BLAKE3 compression functions (and the byte-wise general paths) that the
// kernels use, so their correctness is checked without a GPU. The tree kernels themselves run
// only on a device (tests/gpu).
//
//   host_harness sha256 FILE   -> SHA-256 of the file's bytes
//   host_harness leaf FILE     -> SHA-256(bytes || 0x00)
//   host_harness parent FILE   -> SHA-256(64 bytes || 0x01)
//   host_harness blake3 FILE   -> BLAKE3 of the file's bytes (whole tree, chunk counters from 0)
//   host_harness blake3-keyed FILE -> keyed BLAKE3: the file's first 32 bytes are the key, the
//                                     rest the message (the kernels' runtime key policy, b3_rt_key)
//   host_harness blake3-rt-iv FILE -> BLAKE3 through the runtime key policy holding the IV
//   host_harness blake3-split FILE -> BLAKE3 the way blake3_units_split and blake3_reduce compute
//                                     it: 128-chunk pieces, each reduced like one block, then the
//                                     piece values reduced in groups of 256 (_reduce_chain)
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define VR_NO_KERNELS 1
#include "../../../src/vram_residency/backends/cuda/kernels/sha256_tree.cu"
#include "../../../src/vram_residency/backends/cuda/kernels/blake3.cu"

// BLAKE3 of a whole message by the spec's rule (left subtree = largest power of two of chunks).
template <class K = b3_plain_key>
static void b3_subtree_bytes(const u8* p, u64 len, u64 chunk0, u32 extra, u32 out[8], const K& key = K()) {
    if (len <= 1024) {
        b3_chunk_bytes(p, (u32)len, chunk0, extra, out, key);
        return;
    }
    u64 chunks = (len + 1023) / 1024;
    u64 left = 1;
    while (left * 2 < chunks) left *= 2;
    u32 l[8], r[8];
    b3_subtree_bytes(p, left * 1024, chunk0, 0, l, key);
    b3_subtree_bytes(p + left * 1024, len - left * 1024, chunk0 + left, 0, r, key);
    b3_parent(l, r, extra, out, key);
}

// vr_block_reduce on the host: pairs from the left, the odd node moving up, `top` on the final
// compression (count == 2). nodes[0] holds the result.
static void b3_host_block_reduce(std::vector<std::array<u32, 8>>& nodes, u32 count, u32 top) {
    while (count > 1) {
        const u32 pairs = count >> 1;
        for (u32 t = 0; t < pairs; ++t) {
            u32 o[8];
            b3_parent(nodes[2 * t].data(), nodes[2 * t + 1].data(), count == 2 ? top : 0u, o);
            std::memcpy(nodes[t].data(), o, sizeof o);
        }
        if (count & 1u) nodes[pairs] = nodes[count - 1];
        count = pairs + (count & 1u);
    }
}

// blake3_units_split (one block per piece, thread t hashing chunk t of it with the global chunk
// counter) followed by _reduce_chain's blake3_reduce launches (groups of 256, ROOT on the last).
static void b3_split_emulated(const u8* p, u64 n, u32 out[8]) {
    const u64 piece_bytes = 1ull << B3_SPLIT_SHIFT;
    const u64 pieces = n ? (n + piece_bytes - 1) / piece_bytes : 1;
    const bool single = n <= piece_bytes;
    std::vector<std::array<u32, 8>> level(pieces);
    for (u64 piece = 0; piece < pieces; ++piece) {
        const u64 start = piece * piece_bytes;
        const u32 len = (u32)(n - start < piece_bytes ? n - start : piece_bytes);
        const u32 c_p = len ? (len + 1023u) / 1024u : 1u;
        const u32 root = single ? B3_ROOT : 0u;
        std::vector<std::array<u32, 8>> node(c_p);
        for (u32 t = 0; t < c_p; ++t) {
            const u32 off = t * 1024u;
            const u32 clen = len - off < 1024u ? len - off : 1024u;
            b3_chunk_bytes(p + start + off, clen, piece * B3_SPLIT_CHUNKS + t, c_p == 1 ? root : 0u, node[t].data());
        }
        b3_host_block_reduce(node, c_p, root);
        level[piece] = node[0];
    }
    u64 count = pieces;
    while (count > 1) {
        const bool last = count <= 256;
        const u64 groups = (count + 255) / 256;
        std::vector<std::array<u32, 8>> next(groups);
        for (u64 g = 0; g < groups; ++g) {
            const u32 here = (u32)(count - 256 * g < 256 ? count - 256 * g : 256);
            std::vector<std::array<u32, 8>> grp(level.begin() + 256 * g, level.begin() + 256 * g + here);
            b3_host_block_reduce(grp, here, last ? B3_ROOT : 0u);
            next[g] = grp[0];
        }
        level.swap(next);
        count = groups;
    }
    std::memcpy(out, level[0].data(), 32);
}

static void print_be(const u32 s[8]) {
    for (int i = 0; i < 8; ++i) std::printf("%08x", s[i]);
    std::printf("\n");
}

static void print_le(const u32 s[8]) {
    for (int i = 0; i < 8; ++i)
        for (int b = 0; b < 4; ++b) std::printf("%02x", (s[i] >> (8 * b)) & 0xffu);
    std::printf("\n");
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s sha256|leaf|parent|blake3|blake3-keyed|blake3-rt-iv|blake3-split FILE\n", argv[0]);
        return 2;
    }
    FILE* f = std::fopen(argv[2], "rb");
    if (!f) return 2;
    std::vector<u8> data;
    u8 buf[1 << 16];
    size_t got;
    while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + got);
    std::fclose(f);
    const u8* p = data.empty() ? buf : data.data();
    u32 s[8];
    if (!std::strcmp(argv[1], "sha256")) {
        sha256_bytes(p, data.size(), -1, s);
        print_be(s);
    } else if (!std::strcmp(argv[1], "leaf")) {
        sha256_bytes(p, data.size(), 0x00, s);
        print_be(s);
    } else if (!std::strcmp(argv[1], "parent")) {
        if (data.size() != 64) return 2;
        u32 l[8], r[8];
        for (int i = 0; i < 8; ++i) {
            l[i] = ((u32)p[4 * i] << 24) | ((u32)p[4 * i + 1] << 16) | ((u32)p[4 * i + 2] << 8) | p[4 * i + 3];
            const u8* q = p + 32;
            r[i] = ((u32)q[4 * i] << 24) | ((u32)q[4 * i + 1] << 16) | ((u32)q[4 * i + 2] << 8) | q[4 * i + 3];
        }
        sha256_parent(l, r, s);
        print_be(s);
    } else if (!std::strcmp(argv[1], "blake3")) {
        b3_subtree_bytes(p, data.size(), 0, B3_ROOT, s);
        print_le(s);
    } else if (!std::strcmp(argv[1], "blake3-keyed")) {
        if (data.size() < 32) return 2;
        u32 kw[8];
        for (int i = 0; i < 8; ++i)
            kw[i] = (u32)p[4 * i] | ((u32)p[4 * i + 1] << 8) | ((u32)p[4 * i + 2] << 16) | ((u32)p[4 * i + 3] << 24);
        const b3_rt_key key{kw, B3_KEYED_HASH};
        b3_subtree_bytes(p + 32, data.size() - 32, 0, B3_ROOT, s, key);
        print_le(s);
    } else if (!std::strcmp(argv[1], "blake3-rt-iv")) {
        // An unkeyed row of a segment table: the runtime policy holding the IV, no mode flag.
        u32 iv[8];
        b3_iv(iv);
        const b3_rt_key key{iv, 0u};
        b3_subtree_bytes(p, data.size(), 0, B3_ROOT, s, key);
        print_le(s);
    } else if (!std::strcmp(argv[1], "blake3-split")) {
        b3_split_emulated(p, data.size(), s);
        print_le(s);
    } else {
        return 2;
    }
    return 0;
}
