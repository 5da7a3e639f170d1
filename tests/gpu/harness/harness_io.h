// File input and hex output shared by the nh-fast CPU harnesses (nhf_harness.cu, nhf_kernel_emu.cu).
// Include after nh_fast.cu (for u8).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <vector>

// The whole file at `path` (exit 2 if it cannot be opened), with room reserved past its end so that
// the vector's storage is never of size zero.
static std::vector<u8> slurp(const char* path) {
    std::vector<u8> v;
    FILE* f = std::fopen(path, "rb");
    if (!f) std::exit(2);
    u8 buf[1 << 16];
    size_t got;
    while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) v.insert(v.end(), buf, buf + got);
    std::fclose(f);
    v.reserve(v.size() + 64);
    return v;
}

static void hex(const u8* p, size_t n) {
    for (size_t i = 0; i < n; ++i) std::printf("%02x", p[i]);
}
