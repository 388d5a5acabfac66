/* cuda_runtime.h for running fastops.c's CUDA section on the CPU (tests/test_cuda_emu.py).
 *
 * g++ -x c++ -std=c++20 -D__CUDACC__ -I tests/cuda_emu compiles the CUDA
 * section with this header in place of the real one; the test first turns
 * each `kernel<<<grid, block>>>(args)` into `emu_launch(kernel, grid, block)(args)`.
 *
 * The model:
 * - A launch runs its blocks one after another, on the calling thread.
 * - A block's threads are fibers (ucontext), each with its own stack: a
 *   thread runs until it reaches __syncthreads(), a shuffle or its end, then
 *   the next one runs. When no thread can run, the barrier (or a warp's
 *   shuffle) that every thread concerned waits at opens. Threads that wait
 *   at different barriers, or finished while others wait, are a deadlock:
 *   the launch fails with a message, as a faulting kernel would.
 * - emu_schedule(seed) picks the order threads run in between barriers, and
 *   blocks in a launch: 0 in order, 1 reversed, otherwise shuffled (seeded).
 *   A missing barrier shows up as a wrong result in one order or another.
 * - __shared__ arrays are static thread_local: together they are this
 *   library's TLS segment, which is filled with NaN before each block, so a
 *   read of shared memory the block did not write poisons the result.
 * - Device memory is host memory: cudaMalloc is malloc, plus NaN margins
 *   that a kernel must neither read (NaN in the results) nor write (the
 *   launch fails).
 * This header is compiled into exactly one translation unit. */
#pragma once
#include <link.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

/* ---- CUDA's keywords, types and built-in variables ---- */
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local

struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};
struct alignas(16) float4 { float x, y, z, w; };

/* Everything here is static (internal linkage), so that two emulated
 * libraries loaded in one process keep separate state. */

/* plain globals: one launch runs at a time, and all its threads share one OS thread */
static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorLaunchFailure = 719,
};

/* ---- the emulator ---- */
namespace emu {
namespace {

enum State { RUNNABLE, AT_BARRIER, AT_SHUFFLE, FINISHED };

struct Thread {
    ucontext_t ctx;
    uint3 idx;
    State state;
    int line;          /* source line of the barrier or shuffle it waits at */
    unsigned mask;     /* the lanes of that shuffle */
    unsigned shuffles; /* shuffles done: which slot array the next one uses */
};

constexpr size_t STACK = 256 << 10, PAGE = 4096;

std::vector<Thread> threads; /* the running block's */
int current;                 /* index of the running thread */
ucontext_t scheduler;
std::function<void()> kernel; /* the launched kernel, bound to its arguments */
std::vector<char *> stacks;
/* Two slot arrays: a lane may write its next shuffle's value before its
 * partner has read this one's. */
float slots[2][1024];
unsigned schedule_seed;
std::mt19937 rng;
cudaError_t last_error = cudaSuccess;
std::string error_text = "no error";

/* cudaMalloc'd memory starts as NaN and has NaN margins on both sides (none
 * under AddressSanitizer, whose redzones do better): reading them poisons
 * results, writing them fails the launch. */
#ifdef __SANITIZE_ADDRESS__
constexpr size_t MARGIN = 0;
#else
constexpr size_t MARGIN = 4096;
#endif
std::map<char *, size_t> allocations; /* start of the margin before -> bytes asked for */

/* true if no margin was written; restores them, so that a fault is reported once */
bool margins_intact() {
    bool ok = true;
    for (auto &[p, n] : allocations)
        for (size_t i = 0; i < MARGIN; i++) {
            ok = ok && (unsigned char)p[i] == 0xff && (unsigned char)p[MARGIN + n + i] == 0xff;
            p[i] = p[MARGIN + n + i] = (char)0xff;
        }
    return ok;
}

void fail(cudaError_t e, const std::string &msg) {
    if (last_error == cudaSuccess) {
        last_error = e;
        error_text = msg;
    }
}

void arrange(std::vector<int> &order) {
    std::iota(order.begin(), order.end(), 0);
    if (schedule_seed == 1) std::reverse(order.begin(), order.end());
    if (schedule_seed > 1) std::shuffle(order.begin(), order.end(), rng);
}

/* the running thread waits; the scheduler runs the others */
void wait(State s, int line, unsigned mask = 0) {
    Thread &t = threads[current];
    t.state = s;
    t.line = line;
    t.mask = mask;
    swapcontext(&t.ctx, &scheduler);
}

void syncthreads(int line) { wait(AT_BARRIER, line); }

template <class T>
T shfl_xor_sync(unsigned mask, T v, int lane_mask, int line) {
    static_assert(std::is_same_v<T, float>, "the emulator shuffles floats only");
    float *slot = slots[threads[current].shuffles++ % 2];
    slot[current] = v;
    wait(AT_SHUFFLE, line, mask);
    const int lane = current % 32, src = lane ^ lane_mask;
    if (src >= 32) return v;                            /* outside the warp: own value */
    if (!(mask >> src & 1)) return NAN;                 /* a lane not in the mask: undefined */
    return slot[current - lane + src];
}

/* Called when no thread can run. Opens the shuffles whose lanes all wait at
 * them, else the barrier if every thread waits at the same one. Returns
 * false on a deadlock. */
bool release() {
    const size_t n = threads.size();
    std::vector<char> go(n, 0);
    bool any = false;
    for (size_t i = 0; i < n; i++) {
        const Thread &t = threads[i];
        if (t.state != AT_SHUFFLE || !(t.mask >> (i % 32) & 1)) continue;
        bool all = true;
        for (size_t l = 0, w = i - i % 32; l < 32; l++) {
            if (!(t.mask >> l & 1)) continue;
            const Thread *u = w + l < n ? &threads[w + l] : nullptr;
            all = all && u && u->state == AT_SHUFFLE && u->line == t.line &&
                  u->mask == t.mask && u->shuffles == t.shuffles;
        }
        go[i] = all;
        any = any || all;
    }
    if (any) {
        for (size_t i = 0; i < n; i++)
            if (go[i]) threads[i].state = RUNNABLE;
        return true;
    }
    for (const Thread &t : threads)
        if (t.state != AT_BARRIER || t.line != threads[0].line) return false;
    for (Thread &t : threads) t.state = RUNNABLE;
    return true;
}

std::string deadlock() {
    std::map<std::pair<int, int>, int> where; /* (state, line) -> threads */
    for (const Thread &t : threads) where[{t.state, t.state == FINISHED ? 0 : t.line}]++;
    std::string s = "emulator: deadlock in block (" + std::to_string(blockIdx.x) + "," +
                    std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + "):";
    for (auto &[k, count] : where)
        s += " " + std::to_string(count) +
             (k.first == AT_BARRIER ? " at __syncthreads() line " + std::to_string(k.second)
              : k.first == AT_SHUFFLE ? " at a shuffle line " + std::to_string(k.second)
                                      : std::string(" finished")) + ";";
    return s;
}

void thread_main() {
    kernel();
    threads[current].state = FINISHED; /* returning resumes the scheduler (uc_link) */
}

/* the __shared__ arrays and this anchor make up the library's TLS segment */
thread_local char tls_anchor;

void poison_shared() {
    tls_anchor = 1; /* this thread's copy of the segment exists from here on */
    dl_iterate_phdr([](dl_phdr_info *m, size_t, void *) {
        char *p = (char *)m->dlpi_tls_data;
        for (int i = 0; i < m->dlpi_phnum; i++) {
            const auto &ph = m->dlpi_phdr[i];
            if (ph.p_type == PT_TLS && p && p <= &tls_anchor && &tls_anchor < p + ph.p_memsz) {
                memset(p, 0xff, ph.p_memsz); /* all bits set: a NaN in every float */
                return 1;
            }
        }
        return 0;
    }, nullptr);
}

bool run_block() {
    const int n = threads.size();
    for (int i = 0; i < n; i++) {
        Thread &t = threads[i];
        t.idx = {i % blockDim.x, i / blockDim.x % blockDim.y, i / (blockDim.x * blockDim.y)};
        t.state = RUNNABLE;
        t.shuffles = 0;
        getcontext(&t.ctx);
        t.ctx.uc_stack.ss_sp = stacks[i] + PAGE;
        t.ctx.uc_stack.ss_size = STACK;
        t.ctx.uc_link = &scheduler;
        makecontext(&t.ctx, thread_main, 0);
    }
    std::vector<int> order(n);
    for (;;) {
        arrange(order);
        for (int i : order) {
            if (threads[i].state != RUNNABLE) continue;
            current = i;
            threadIdx = threads[i].idx;
            swapcontext(&scheduler, &threads[i].ctx);
        }
        if (std::all_of(threads.begin(), threads.end(),
                        [](const Thread &t) { return t.state == FINISHED; }))
            return true;
        if (!release()) return false;
    }
}

void launch(dim3 grid, dim3 block, std::function<void()> call) {
    const unsigned long n = (unsigned long)block.x * block.y * block.z;
    if (n < 1 || n > 1024 || block.z > 64 || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
        grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
        fail(cudaErrorInvalidConfiguration, "invalid configuration argument");
        return;
    }
    gridDim = grid;
    blockDim = block;
    kernel = std::move(call);
    while (stacks.size() < n) { /* kept for later launches; a PROT_NONE page below each */
        char *p = (char *)mmap(nullptr, STACK + PAGE, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) abort();
        mprotect(p, PAGE, PROT_NONE);
        stacks.push_back(p);
    }
    threads.assign(n, Thread{});
    std::vector<int> blocks((size_t)grid.x * grid.y * grid.z);
    arrange(blocks);
    for (int b : blocks) {
        blockIdx = {b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y)};
        poison_shared();
        if (!run_block()) {
            fail(cudaErrorLaunchFailure, deadlock());
            return;
        }
    }
    if (!margins_intact())
        fail(cudaErrorLaunchFailure, "emulator: a kernel wrote outside a cudaMalloc'd buffer");
}

template <class... P>
struct Launch {
    void (*kernel)(P...);
    dim3 grid, block;
    /* arguments convert to the kernel's parameter types here, as in CUDA */
    void operator()(P... args) const {
        emu::launch(grid, block, [&] { kernel(args...); }); /* each thread copies them */
    }
};

} // namespace
} // namespace emu

/* what the test turns kernel<<<grid, block>>>(args) into: emu_launch(kernel, grid, block)(args) */
template <class... P>
static emu::Launch<P...> emu_launch(void (*kernel)(P...), dim3 grid, dim3 block) {
    return {kernel, grid, block};
}

#define __syncthreads() emu::syncthreads(__LINE__)
#define __shfl_xor_sync(mask, v, lane_mask) emu::shfl_xor_sync(mask, v, lane_mask, __LINE__)

/* ---- the runtime API fastops.c uses ---- */
static cudaError_t cudaGetLastError() {
    cudaError_t e = emu::last_error;
    emu::last_error = cudaSuccess;
    return e;
}
static const char *cudaGetErrorString(cudaError_t e) {
    return e == cudaSuccess ? "no error" : emu::error_text.c_str();
}
static cudaError_t cudaDeviceSynchronize() { return cudaSuccess; } /* launches are synchronous */
static cudaError_t cudaMalloc(void **p, size_t n) {
    char *m = (char *)malloc(n + 2 * emu::MARGIN);
    *p = m ? m + emu::MARGIN : nullptr;
    if (!m) return cudaErrorMemoryAllocation;
    memset(m, 0xff, n + 2 * emu::MARGIN); /* all bits set: a NaN in every float */
    emu::allocations[m] = n;
    return cudaSuccess;
}
static cudaError_t cudaFree(void *p) {
    if (p) {
        emu::allocations.erase((char *)p - emu::MARGIN);
        free((char *)p - emu::MARGIN);
    }
    return cudaSuccess;
}

/* for the test: the order threads and blocks run in (see the top) */
extern "C" void emu_schedule(unsigned seed) {
    emu::schedule_seed = seed;
    emu::rng.seed(seed);
}
