/*
 * Native host accelerator for the unit digests of `sha256-tree-v1` (specs/sha256-tree-v1.md).
 *
 * Why C: hashing 4 KiB leaves one by one from Python pays OpenSSL 3's per-call EVP dispatch and
 * holds the GIL between calls, which caps the pure-Python path near 0.9 GB/s on one core and
 * keeps it from scaling. Here each thread runs the whole leaf/parent loop for a contiguous
 * range of 1 MiB units without returning to Python; ctypes releases the GIL around the call.
 *
 * Why no OpenSSL headers and no link against -lcrypto: a fresh machine may have a C compiler but
 * no libssl-dev. The few functions used are declared here and resolved at run time with dlsym
 * from the libcrypto that the Python side names (the one its own _hashlib already loaded), so
 * the same SHA-NI code path that hashlib uses does the work.
 *
 * The low-level SHA256_Init/Update/Final API is deprecated in OpenSSL 3 but still exported by
 * libcrypto.so.3, and it calls the assembly block function directly, without the EVP method
 * fetch and provider indirection that dominate for short inputs such as 65-byte parents.
 */

#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define LEAF_SIZE 4096u
#define UNIT_SIZE (1u << 20)
#define LEAVES_PER_UNIT (UNIT_SIZE / LEAF_SIZE)
#define DIGEST 32u
#define MAX_THREADS 256

/*
 * OpenSSL's SHA256_CTX is { uint32 h[8], Nl, Nh, data[16], num, md_len } = 112 bytes. We only
 * ever pass its address to libcrypto, so an opaque, generously sized and aligned block is
 * enough and does not depend on the header.
 */
typedef struct {
    _Alignas(16) unsigned char opaque[256];
} sha256_ctx;

typedef int (*sha_init_fn)(sha256_ctx *);
typedef int (*sha_update_fn)(sha256_ctx *, const void *, size_t);
typedef int (*sha_final_fn)(unsigned char *, sha256_ctx *);

static sha_init_fn p_init;
static sha_update_fn p_update;
static sha_final_fn p_final;

/* Returns 0 when libcrypto at `path` provides the three functions; negative otherwise. */
int treehash_init(const char *path) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        return -1;
    }
    sha_init_fn i = (sha_init_fn)dlsym(lib, "SHA256_Init");
    sha_update_fn u = (sha_update_fn)dlsym(lib, "SHA256_Update");
    sha_final_fn f = (sha_final_fn)dlsym(lib, "SHA256_Final");
    if (i == NULL || u == NULL || f == NULL) {
        /* Keep the handle: dlclose of libcrypto is unsafe while Python's _hashlib uses it. */
        return -2;
    }
    p_init = i;
    p_update = u;
    p_final = f;
    return 0;
}

/* SHA-256(data || suffix): the one shape every node of the tree has. */
static inline void hash_with_suffix(const unsigned char *data, size_t len, unsigned char suffix,
                                    unsigned char *out) {
    sha256_ctx ctx;
    p_init(&ctx);
    if (len) {
        p_update(&ctx, data, len);
    }
    p_update(&ctx, &suffix, 1);
    p_final(out, &ctx);
}

/*
 * Root of one unit's subtree. `len` is 1..UNIT_SIZE, or 0 for the empty message, whose single
 * empty leaf gives SHA-256(0x00). Level 0 is built in `nodes`, then reduced in place: pairs from
 * the left, an unpaired last node moves up unchanged (spec step 4), so partial units match too.
 */
static void unit_root(const unsigned char *p, size_t len, unsigned char *out) {
    unsigned char nodes[LEAVES_PER_UNIT][DIGEST];
    size_t k = 0;
    size_t off = 0;
    do {
        size_t take = len - off < LEAF_SIZE ? len - off : LEAF_SIZE;
        hash_with_suffix(p + off, take, 0x00, nodes[k++]);
        off += take;
    } while (off < len);

    while (k > 1) {
        size_t m = 0;
        for (size_t i = 0; i + 1 < k; i += 2) {
            /* nodes[i] and nodes[i+1] are adjacent, so the 64-byte parent input is contiguous. */
            hash_with_suffix(nodes[i], 2 * DIGEST, 0x01, nodes[m++]);
        }
        if (k & 1) {
            memmove(nodes[m++], nodes[k - 1], DIGEST);
        }
        k = m;
    }
    memcpy(out, nodes[0], DIGEST);
}

typedef struct {
    const unsigned char *buf;
    uint64_t n;
    uint64_t first, last; /* unit index range [first, last) */
    unsigned char *out;
} job;

static void run_job(const job *j) {
    for (uint64_t u = j->first; u < j->last; u++) {
        uint64_t off = u * (uint64_t)UNIT_SIZE;
        uint64_t rest = j->n - off;
        size_t len = rest < UNIT_SIZE ? (size_t)rest : UNIT_SIZE;
        unit_root(j->buf + off, len, j->out + u * DIGEST);
    }
}

static void *thread_main(void *arg) {
    run_job((const job *)arg);
    return NULL;
}

/*
 * Writes 32 * max(1, ceil(n / 1 MiB)) bytes of unit digests to `out`, using up to `threads`
 * threads that each take one contiguous range of units (sequential reads stay prefetch-friendly
 * and no two threads share an output cache line except at the range borders).
 * Returns 0 on success, -1 when treehash_init has not succeeded.
 */
int treehash_sha256_units(const unsigned char *buf, uint64_t n, unsigned char *out, int threads) {
    if (p_init == NULL) {
        return -1;
    }
    uint64_t units = n == 0 ? 1 : (n + UNIT_SIZE - 1) / UNIT_SIZE;
    uint64_t t = threads < 1 ? 1 : (uint64_t)threads;
    if (t > MAX_THREADS) {
        t = MAX_THREADS;
    }
    if (t > units) {
        t = units;
    }

    job jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    for (uint64_t i = 0; i < t; i++) {
        /* Balanced split: the first (units % t) ranges get one extra unit. */
        uint64_t base = units / t, extra = units % t;
        jobs[i].buf = buf;
        jobs[i].n = n;
        jobs[i].first = i * base + (i < extra ? i : extra);
        jobs[i].last = jobs[i].first + base + (i < extra ? 1 : 0);
        jobs[i].out = out;
    }
    /* Range 0 runs on the calling thread, so one thread never pays for a pthread_create. */
    for (uint64_t i = 1; i < t; i++) {
        started[i] = pthread_create(&tids[i], NULL, thread_main, &jobs[i]) == 0;
        if (!started[i]) {
            run_job(&jobs[i]); /* out of threads: still correct, just slower */
        }
    }
    run_job(&jobs[0]);
    for (uint64_t i = 1; i < t; i++) {
        if (started[i]) {
            pthread_join(tids[i], NULL);
        }
    }
    return 0;
}
