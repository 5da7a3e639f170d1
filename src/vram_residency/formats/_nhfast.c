/*
 * Native host path of `nh-fast-v1` (docs/specs/nh-fast-v1.md): the leaf tags.
 *
 * Why C: the leaf tags are all of the work (three NH sums per 4 KiB leaf; the keyed BLAKE3 layers
 * above them see 24 bytes per leaf and run in the blake3 package). NH is an add, a shift, a
 * 32x32->64 multiply and a 64-bit add per pair of words, which maps one to one onto AVX2's
 * vpaddd / vpsrlq / vpmuludq / vpaddq (and AVX-512's, twice as wide), so one core reads faster
 * than the page cache delivers. The vector paths are compiled with target attributes and chosen
 * at run time: the library itself is built without -march and runs on any x86-64 or aarch64
 * machine (the portable C loop is the fallback and the definition the vector code must match).
 *
 * Each thread takes a contiguous range of leaves (sequential reads stay prefetch-friendly);
 * ctypes releases the GIL around the call.
 */

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NHF_X86 1
#endif

#define LEAF 4096u
#define SHIFT 512u            /* Toeplitz shift between instances, bytes */
#define INSTANCES 3u
#define KEY_BYTES (LEAF + SHIFT * (INSTANCES - 1u))
#define TAG (8u * INSTANCES)
#define MAX_THREADS 256

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "nh-fast-v1 native path assumes a little-endian host (words and tags are little-endian)"
#endif

typedef void (*leaf_fn)(const unsigned char *m, const unsigned char *k, uint64_t h[INSTANCES]);

static inline uint32_t ld32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The spec's step 3, word by word. */
static void leaf_portable(const unsigned char *m, const unsigned char *k, uint64_t h[INSTANCES]) {
    for (unsigned t = 0; t < INSTANCES; t++) {
        const unsigned char *kt = k + SHIFT * t;
        uint64_t sum = 0;
        for (unsigned i = 0; i < LEAF; i += 8) {
            uint32_t a = ld32(m + i) + ld32(kt + i);
            uint32_t b = ld32(m + i + 4) + ld32(kt + i + 4);
            sum += (uint64_t)a * b;
        }
        h[t] = sum;
    }
}

#ifdef NHF_X86
/* vpmuludq multiplies the low 32 bits of each 64-bit lane: with a = m + k as 32-bit lanes,
 * a * (a >> 32) is (m[2p] + k[2p]) * (m[2p+1] + k[2p+1]) for the pair p held in that lane. */
__attribute__((target("avx2"))) static void leaf_avx2(const unsigned char *m, const unsigned char *k,
                                                       uint64_t h[INSTANCES]) {
    __m256i acc[INSTANCES][2];
    for (unsigned t = 0; t < INSTANCES; t++) acc[t][0] = acc[t][1] = _mm256_setzero_si256();
    for (unsigned i = 0; i < LEAF; i += 64) {
        __m256i d0 = _mm256_loadu_si256((const __m256i *)(m + i));
        __m256i d1 = _mm256_loadu_si256((const __m256i *)(m + i + 32));
        for (unsigned t = 0; t < INSTANCES; t++) {
            const unsigned char *kt = k + SHIFT * t + i;
            __m256i a0 = _mm256_add_epi32(d0, _mm256_loadu_si256((const __m256i *)kt));
            __m256i a1 = _mm256_add_epi32(d1, _mm256_loadu_si256((const __m256i *)(kt + 32)));
            acc[t][0] = _mm256_add_epi64(acc[t][0], _mm256_mul_epu32(a0, _mm256_srli_epi64(a0, 32)));
            acc[t][1] = _mm256_add_epi64(acc[t][1], _mm256_mul_epu32(a1, _mm256_srli_epi64(a1, 32)));
        }
    }
    for (unsigned t = 0; t < INSTANCES; t++) {
        uint64_t lanes[4];
        _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(acc[t][0], acc[t][1]));
        h[t] = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    }
}

__attribute__((target("avx512f"))) static void leaf_avx512(const unsigned char *m, const unsigned char *k,
                                                            uint64_t h[INSTANCES]) {
    __m512i acc[INSTANCES][2];
    for (unsigned t = 0; t < INSTANCES; t++) acc[t][0] = acc[t][1] = _mm512_setzero_si512();
    for (unsigned i = 0; i < LEAF; i += 128) {
        __m512i d0 = _mm512_loadu_si512((const void *)(m + i));
        __m512i d1 = _mm512_loadu_si512((const void *)(m + i + 64));
        for (unsigned t = 0; t < INSTANCES; t++) {
            const unsigned char *kt = k + SHIFT * t + i;
            __m512i a0 = _mm512_add_epi32(d0, _mm512_loadu_si512((const void *)kt));
            __m512i a1 = _mm512_add_epi32(d1, _mm512_loadu_si512((const void *)(kt + 64)));
            acc[t][0] = _mm512_add_epi64(acc[t][0], _mm512_mul_epu32(a0, _mm512_srli_epi64(a0, 32)));
            acc[t][1] = _mm512_add_epi64(acc[t][1], _mm512_mul_epu32(a1, _mm512_srli_epi64(a1, 32)));
        }
    }
    for (unsigned t = 0; t < INSTANCES; t++) {
        uint64_t lanes[8];
        _mm512_storeu_si512((void *)lanes, _mm512_add_epi64(acc[t][0], acc[t][1]));
        uint64_t s = 0;
        for (int j = 0; j < 8; j++) s += lanes[j];
        h[t] = s;
    }
}
#endif

/*
 * 0 portable, 1 AVX2, 2 AVX-512F; `want` < 0 picks the default, otherwise at most `want`.
 * The default is AVX2 even where AVX-512F exists: on the development machine (2026-11-29) the
 * AVX-512 loop ran at half the AVX2 rate (10 against 21 GiB/s on one core, bench/nhfast_host.py),
 * so it is only taken when asked for.
 */
static leaf_fn pick(int want, int *chosen) {
#ifdef NHF_X86
    __builtin_cpu_init();
    if (want >= 2 && __builtin_cpu_supports("avx512f")) {
        *chosen = 2;
        return leaf_avx512;
    }
    if ((want < 0 || want >= 1) && __builtin_cpu_supports("avx2")) {
        *chosen = 1;
        return leaf_avx2;
    }
#else
    (void)want;
#endif
    *chosen = 0;
    return leaf_portable;
}

/* Which path `nhfast_leaf_tags(..., want)` runs on this CPU (for benchmarks and tests). */
int nhfast_path(int want) {
    int chosen;
    pick(want, &chosen);
    return chosen;
}

typedef struct {
    const unsigned char *buf;
    uint64_t n;
    uint64_t first, last; /* leaf range [first, last) */
    const unsigned char *key;
    unsigned char *out;
    leaf_fn fn;
} job;

static void run_job(const job *j) {
    uint64_t h[INSTANCES];
    for (uint64_t i = j->first; i < j->last; i++) {
        uint64_t off = i * (uint64_t)LEAF;
        uint64_t rest = j->n - off;
        if (rest >= LEAF) {
            j->fn(j->buf + off, j->key, h);
        } else {
            /* The last, short leaf (or the empty message): zero-padded to 4096 bytes. */
            _Alignas(64) unsigned char pad[LEAF];
            memset(pad, 0, sizeof pad);
            if (rest) memcpy(pad, j->buf + off, (size_t)rest);
            j->fn(pad, j->key, h);
        }
        memcpy(j->out + i * TAG, h, TAG); /* little-endian host: LE64 per instance */
    }
}

static void *thread_main(void *arg) {
    run_job((const job *)arg);
    return NULL;
}

/*
 * Writes TAG * max(1, ceil(n / 4096)) bytes of leaf tags to `out`, with up to `threads` threads.
 * `key` is the KEY_BYTES-byte NH key. `want`: see pick(). Returns 0, or -1 on bad arguments.
 */
int nhfast_leaf_tags(const unsigned char *buf, uint64_t n, const unsigned char *key, unsigned char *out,
                     int threads, int want) {
    if (key == NULL || out == NULL || (buf == NULL && n != 0)) return -1;
    int chosen;
    leaf_fn fn = pick(want, &chosen);
    uint64_t leaves = n == 0 ? 1 : (n + LEAF - 1) / LEAF;
    uint64_t t = threads < 1 ? 1 : (uint64_t)threads;
    if (t > MAX_THREADS) t = MAX_THREADS;
    /* Below 64 leaves per thread, thread start-up costs more than it saves. */
    if (t > leaves / 64) t = leaves / 64 ? leaves / 64 : 1;

    job jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    uint64_t per = leaves / t, extra = leaves % t, at = 0;
    for (uint64_t i = 0; i < t; i++) {
        uint64_t cnt = per + (i < extra ? 1 : 0);
        jobs[i] = (job){buf, n, at, at + cnt, key, out, fn};
        at += cnt;
    }
    for (uint64_t i = 1; i < t; i++) {
        started[i] = pthread_create(&tids[i], NULL, thread_main, &jobs[i]) == 0;
        if (!started[i]) run_job(&jobs[i]); /* no thread: do it here, the result is the same */
    }
    run_job(&jobs[0]);
    for (uint64_t i = 1; i < t; i++) {
        if (started[i]) pthread_join(tids[i], NULL);
    }
    return 0;
}
