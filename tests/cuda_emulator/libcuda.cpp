// libcuda.cpp: a stand-in for the NVIDIA driver (`libcuda.so`) that runs lathe's own kernels,
// compiled from cuda/*.cu as C++ (cuda_builtins.h), on the CPU. It implements the part of the
// driver API cudarc calls for lathe's training backend, so `daemon/train/cuda.rs` runs unchanged
// on a machine without a GPU: the probe, the context, NVRTC's PTX (checked, not executed), every
// launch with its grid and its arguments, every copy. What it proves and what it cannot is in
// README.md here.
//
// Device memory is host memory, each allocation ending at a page with no access rights and
// filled with NaN, so a kernel that reads or writes past its buffer, or reads what nothing
// wrote, fails the test instead of passing by luck. Everything is synchronous; launches are
// serialized.
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cuda_builtins.h"

// The kernels, exactly as NVRTC compiles them.
#include "gemm_f32.cu"
#include "layer_f32.cu"
#include "lora_f32.cu"
#include "loss_f32.cu"
#include "optim_f32.cu"

namespace {

// --- The kernels by name --------------------------------------------------------------------

template <typename... A, std::size_t... I>
void invoke(void (*f)(A...), void** params, std::index_sequence<I...>) {
    // cuLaunchKernel's kernelParams: one pointer per argument, to the argument's value.
    f(*static_cast<A*>(params[I])...);
}

struct Kernel {
    const char* name;
    std::size_t arity;
    void (*run)(void**);
};

template <typename... A>
constexpr std::size_t arity(void (*)(A...)) {
    return sizeof...(A);
}

#define KERNEL(f) \
    Kernel { #f, arity(f), [](void** p) { invoke(f, p, std::make_index_sequence<arity(f)>{}); } }

const Kernel KERNELS[] = {
    KERNEL(gemm_f32),         KERNEL(dense_f32),          KERNEL(dense_backward_f32), KERNEL(add_bias_f32),
    KERNEL(activation_f32),
    KERNEL(activation_grad_f32), KERNEL(softmax_rows_f32), KERNEL(softmax_grad_f32), KERNEL(bias_grad_f32),
    KERNEL(lora_merge_f32),   KERNEL(mse_f32),            KERNEL(bce_logits_f32),   KERNEL(softmax_xent_f32),
    KERNEL(reduce_pairs_f32), KERNEL(sgd_all_f32),        KERNEL(adam_all_f32),     KERNEL(sum_squares_all_f32),
    KERNEL(clip_all_f32),     KERNEL(scale_f32),          KERNEL(sum_squares_f32),
};

// --- Device memory --------------------------------------------------------------------------

struct Allocation {
    char* map;
    std::size_t map_len;
    std::size_t len;
};

std::mutex lock;  // one driver call at a time
// What the calling thread asked of the driver, for tests that count (every call is synchronous,
// so a thread's counts are its own): see lathe_emulator_counts below.
thread_local unsigned long thread_allocations = 0, thread_launches = 0, thread_calls = 0;
std::map<std::uintptr_t, Allocation> allocations;
std::size_t held_bytes = 0;
const std::size_t PAGE = 4096;
const std::size_t TOTAL_MEM = std::size_t(8) << 30;

std::uintptr_t allocate(std::size_t bytes) {
    // lathe's buffers are f32: 4-byte granularity keeps the guard page right behind the last float.
    std::size_t len = (bytes + 3) & ~std::size_t(3);
    std::size_t data_pages = (len + PAGE - 1) / PAGE;
    std::size_t map_len = (data_pages + 1) * PAGE;
    void* map = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return 0;
    char* base = static_cast<char*>(map);
    mprotect(base + data_pages * PAGE, PAGE, PROT_NONE);
    char* user = base + data_pages * PAGE - len;
    std::memset(user, 0xff, len);  // NaN in every float until something writes it
    allocations[reinterpret_cast<std::uintptr_t>(user)] = Allocation{base, map_len, len};
    held_bytes += len;
    return reinterpret_cast<std::uintptr_t>(user);
}

// Whether [p, p + bytes) lies inside one allocation.
bool inside(std::uintptr_t p, std::size_t bytes) {
    auto it = allocations.upper_bound(p);
    if (it == allocations.begin()) return false;
    --it;
    return p >= it->first && p + bytes <= it->first + it->second.len;
}

// --- Running a grid: blocks in turn, a block's threads as fibers ----------------------------

const std::size_t STACK = 64 << 10;

struct Barrier {
    unsigned live = 0, arrived = 0;
    unsigned long phase = 0;
};

// Switching between fibers. On x86-64 a few instructions that save the callee-saved registers
// (glibc's swapcontext also saves the signal mask: a system call per switch, 50× slower);
// elsewhere ucontext.
#if defined(__x86_64__) && !defined(LATHE_EMULATOR_UCONTEXT)
extern "C" void emu_switch(void** save_sp, void* to_sp);
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

struct Context {
    void* sp;
};
Context scheduler;

// A fresh fiber that starts in `entry` (which must never return) on `stack`.
void start(Context& c, char* stack, std::size_t size, void (*entry)()) {
    auto top = reinterpret_cast<std::uintptr_t>(stack + size) & ~std::uintptr_t(15);
    auto* sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                             // entry's return address: none
    *--sp = reinterpret_cast<void*>(entry);      // where emu_switch's `ret` goes
    for (int i = 0; i < 6; ++i) *--sp = nullptr; // rbp rbx r12..r15
    c.sp = sp;
}
void switch_to(Context& save, Context& to) { emu_switch(&save.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
};
Context scheduler;

void start(Context& c, char* stack, std::size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
void switch_to(Context& save, Context& to) { swapcontext(&save.uc, &to.uc); }
#endif

std::vector<emu::Thread> threads;
std::vector<std::unique_ptr<char[]>> stacks;
std::vector<float> lanes;  // what each thread offers to a warp shuffle
Barrier block_barrier;
std::vector<Barrier> warp_barriers;
unsigned long progress = 0;
const Kernel* running = nullptr;
bool as_fibers = true;  // false: the kernel has no barrier (its PTX says so), threads are plain calls
void** running_params = nullptr;
std::string fault;  // the first misuse seen in this launch

}  // namespace

struct emu::Thread {
    Context ctx;
    uint3 idx;
    unsigned linear;
    bool done;
};

emu::Thread* emu::current = nullptr;
uint3 emu::block_idx, emu::block_dim, emu::grid_dim;

const uint3& emu::thread_idx() { return current->idx; }

namespace {

void yield() { switch_to(emu::current->ctx, scheduler); }

void arrive(Barrier& b) {
    unsigned long phase = b.phase;
    ++progress;
    if (++b.arrived == b.live) {
        b.arrived = 0;
        ++b.phase;
        return;
    }
    while (b.phase == phase) yield();
}

// A thread that returned holds no barrier up (as on the GPU since Volta).
void leave(Barrier& b) {
    --b.live;
    if (b.arrived > 0 && b.arrived == b.live) {
        b.arrived = 0;
        ++b.phase;
    }
}

void fiber_main() {
    running->run(running_params);
    emu::Thread* t = emu::current;
    t->done = true;
    ++progress;
    leave(block_barrier);
    leave(warp_barriers[t->linear >> 5]);
    switch_to(t->ctx, scheduler);  // never resumed
}

std::string launch(const Kernel& k, bool barriers, uint3 grid, uint3 block, void** params) {
    unsigned n = block.x * block.y * block.z;
    if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0)
        return "invalid launch shape";
    while (stacks.size() < n) stacks.emplace_back(new char[STACK]);
    threads.assign(n, emu::Thread{});
    lanes.assign(n, 0.0f);
    running = &k;
    running_params = params;
    as_fibers = barriers;
    fault.clear();
    emu::block_dim = block;
    emu::grid_dim = grid;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                emu::block_idx = uint3{bx, by, bz};
                if (!as_fibers) {
                    // No barrier: each thread runs to its end in turn (most kernels; ~100× faster).
                    for (unsigned i = 0; i < n; ++i) {
                        threads[i].linear = i;
                        threads[i].idx = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
                        emu::current = &threads[i];
                        k.run(params);
                    }
                    if (!fault.empty()) return fault;
                    continue;
                }
                block_barrier = Barrier{n, 0, 0};
                warp_barriers.assign((n + 31) / 32, Barrier{});
                for (unsigned w = 0; w < warp_barriers.size(); ++w)
                    warp_barriers[w].live = std::min(32u, n - 32 * w);
                for (unsigned i = 0; i < n; ++i) {
                    emu::Thread& t = threads[i];
                    t.linear = i;
                    t.idx = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
                    t.done = false;
                    start(t.ctx, stacks[i].get(), STACK, fiber_main);
                }
                unsigned remaining = n;
                while (remaining > 0) {
                    unsigned long before = progress;
                    for (unsigned i = 0; i < n; ++i) {
                        if (threads[i].done) continue;
                        emu::current = &threads[i];
                        switch_to(scheduler, threads[i].ctx);
                        if (threads[i].done) --remaining;
                    }
                    if (remaining > 0 && progress == before) {
                        return "deadlock: threads of block (" + std::to_string(bx) + "," + std::to_string(by) +
                               ") wait at a barrier the others never reach";
                    }
                }
                if (!fault.empty()) return fault;
            }
    return "";
}

// Faults inside a kernel: say which kernel and where, then end the process (as the GPU
// would end the context). Outside a kernel the previous handler (Rust's) decides.
struct sigaction previous_segv;

void on_segv(int sig, siginfo_t* info, void* uctx) {
    if (running != nullptr && emu::current != nullptr) {
        char msg[256];
        int len = std::snprintf(msg, sizeof msg,
                                "cuda emulator: %s, block (%u,%u,%u) thread (%u,%u,%u), touched %p outside every "
                                "buffer\n",
                                running->name, emu::block_idx.x, emu::block_idx.y, emu::block_idx.z,
                                emu::current->idx.x, emu::current->idx.y, emu::current->idx.z, info->si_addr);
        if (write(2, msg, len > 0 ? len : 0) < 0) {
        }
        _exit(86);
    }
    sigaction(SIGSEGV, &previous_segv, nullptr);
    (void)sig;
    (void)uctx;
}

}  // namespace

// A barrier in a kernel run without fibers: the PTX scan below missed it. Fail the launch.
bool barrier_unexpected() {
    if (as_fibers) return false;
    if (fault.empty()) fault = std::string(running->name) + ": a barrier its PTX did not show";
    return true;
}

void emu::sync_block() {
    if (!barrier_unexpected()) arrive(block_barrier);
}

float emu::shfl_down(float v, int offset) {
    if (barrier_unexpected()) return v;
    unsigned t = current->linear, lane = t & 31;
    Barrier& w = warp_barriers[t >> 5];
    // lathe's shuffles name all 32 lanes (mask 0xffffffff): the whole warp must be there.
    if (w.live != 32 && fault.empty())
        fault = std::string(running->name) + ": a full-warp shuffle in a warp of " + std::to_string(w.live) +
                " threads";
    lanes[t] = v;
    arrive(w);
    float r = (lane + offset < 32 && t + offset < lanes.size()) ? lanes[t + offset] : v;
    arrive(w);
    return r;
}

float emu::atomic_add(float* p, float v) {
    float old = *p;  // fibers never run at the same time
    *p = old + v;
    return old;
}

// --- The driver API ---------------------------------------------------------------------------

namespace {

enum : int {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    NOT_FOUND = 500,
    LAUNCH_FAILED = 719,
};

bool initialized = false;
thread_local void* current_ctx = nullptr;
int primary_ctx = 1;  // its address is the context handle
// What a module's PTX says about each kernel.
struct Entry {
    std::size_t params;
    bool barriers;  // bar.sync or a warp shuffle: its threads must run as fibers
};
struct Module {
    std::map<std::string, Entry> entries;
};
// A function handle: the C++ kernel and how to run it.
struct Function {
    const Kernel* kernel;
    bool barriers;
};
std::string last_error;

// The device it claims to be: Jetson Orin's compute capability, unless LATHE_EMULATED_SM says
// otherwise ("90" for Hopper).
int arch() {
    const char* sm = std::getenv("LATHE_EMULATED_SM");
    return sm != nullptr ? std::atoi(sm) : 87;
}

}  // namespace

extern "C" {

int cuInit(unsigned) {
    ++thread_calls;
    std::lock_guard<std::mutex> g(lock);
    if (!initialized) {
        struct sigaction sa{};
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &previous_segv);
        initialized = true;
    }
    return SUCCESS;
}

int cuDriverGetVersion(int* v) {
    ++thread_calls;
    *v = 12060;
    return SUCCESS;
}

int cuDeviceGetCount(int* n) {
    ++thread_calls;
    *n = 1;
    return initialized ? SUCCESS : NOT_INITIALIZED;
}

int cuDeviceGet(int* dev, int ordinal) {
    ++thread_calls;
    if (!initialized) return NOT_INITIALIZED;
    if (ordinal != 0) return INVALID_DEVICE;
    *dev = 0;
    return SUCCESS;
}

int cuDeviceGetName(char* name, int len, int) {
    ++thread_calls;
    std::snprintf(name, len, "lathe CUDA emulator (sm_%d, CPU)", arch());
    return SUCCESS;
}

int cuDeviceGetAttribute(int* v, int attrib, int) {
    ++thread_calls;
    switch (attrib) {
        case 75: *v = arch() / 10; break;   // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = arch() % 10; break;   // COMPUTE_CAPABILITY_MINOR
        case 115: *v = 1; break;            // MEMORY_POOLS_SUPPORTED
        case 1: *v = 1024; break;           // MAX_THREADS_PER_BLOCK
        case 10: *v = 32; break;            // WARP_SIZE
        default: *v = 0;
    }
    return SUCCESS;
}

int cuDeviceTotalMem_v2(std::size_t* bytes, int) {
    ++thread_calls;
    *bytes = TOTAL_MEM;
    return SUCCESS;
}

int cuDevicePrimaryCtxRetain(void** ctx, int) {
    ++thread_calls;
    *ctx = &primary_ctx;
    return SUCCESS;
}

int cuDevicePrimaryCtxRelease_v2(int) {
    ++thread_calls;
    return SUCCESS;
}

int cuCtxGetCurrent(void** ctx) {
    ++thread_calls;
    *ctx = current_ctx;
    return SUCCESS;
}

int cuCtxSetCurrent(void* ctx) {
    ++thread_calls;
    current_ctx = ctx;
    return SUCCESS;
}

int cuCtxSynchronize() {
    ++thread_calls;
    return SUCCESS;
}

// Not 0 as on today's GPUs, so a test tells a stream made at the lowest priority the driver
// reports from one made at a hard-coded 0.
const int LEAST_PRIORITY = 2, GREATEST_PRIORITY = -3;
int last_stream_priority = -100;

int cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    ++thread_calls;
    *least = LEAST_PRIORITY;
    *greatest = GREATEST_PRIORITY;
    return SUCCESS;
}

int cuStreamCreateWithPriority(void** stream, unsigned, int priority) {
    ++thread_calls;
    std::lock_guard<std::mutex> guard(lock);
    // The driver clamps a priority outside its range.
    last_stream_priority = std::max(GREATEST_PRIORITY, std::min(LEAST_PRIORITY, priority));
    *stream = new int(0);
    return SUCCESS;
}

int cuStreamCreate(void** stream, unsigned) {
    ++thread_calls;
    *stream = new int(0);
    return SUCCESS;
}

int cuStreamDestroy_v2(void* stream) {
    ++thread_calls;
    delete static_cast<int*>(stream);
    return SUCCESS;
}

int cuStreamSynchronize(void*) {
    ++thread_calls;
    return SUCCESS;
}
int cuStreamWaitEvent(void*, void*, unsigned) {
    ++thread_calls;
    return SUCCESS;
}

int cuEventCreate(void** event, unsigned) {
    ++thread_calls;
    *event = new int(0);
    return SUCCESS;
}

int cuEventDestroy_v2(void* event) {
    ++thread_calls;
    delete static_cast<int*>(event);
    return SUCCESS;
}

int cuEventRecord(void*, void*) {
    ++thread_calls;
    return SUCCESS;
}
int cuEventSynchronize(void*) {
    ++thread_calls;
    return SUCCESS;
}
int cuEventQuery(void*) {
    ++thread_calls;
    return SUCCESS;
}

int cuMemGetInfo_v2(std::size_t* free_bytes, std::size_t* total) {
    ++thread_calls;
    std::lock_guard<std::mutex> g(lock);
    *total = TOTAL_MEM;
    *free_bytes = TOTAL_MEM - held_bytes;
    return SUCCESS;
}

int cuMemAlloc_v2(std::uintptr_t* ptr, std::size_t bytes) {
    ++thread_calls;
    std::lock_guard<std::mutex> g(lock);
    ++thread_allocations;
    if (held_bytes + bytes > TOTAL_MEM) return OUT_OF_MEMORY;
    *ptr = allocate(bytes);
    return *ptr != 0 ? SUCCESS : OUT_OF_MEMORY;
}

int cuMemAllocAsync(std::uintptr_t* ptr, std::size_t bytes, void*) {
    return cuMemAlloc_v2(ptr, bytes);
}

int cuMemFree_v2(std::uintptr_t ptr) {
    ++thread_calls;
    std::lock_guard<std::mutex> g(lock);
    auto it = allocations.find(ptr);
    if (it == allocations.end()) return INVALID_VALUE;
    held_bytes -= it->second.len;
    munmap(it->second.map, it->second.map_len);
    allocations.erase(it);
    return SUCCESS;
}

int cuMemFreeAsync(std::uintptr_t ptr, void*) {
    return cuMemFree_v2(ptr);
}

int cuMemsetD8Async(std::uintptr_t dst, unsigned char value, std::size_t n, void*) {
    ++thread_calls;
    std::lock_guard<std::mutex> g(lock);
    if (!inside(dst, n)) return INVALID_VALUE;
    std::memset(reinterpret_cast<void*>(dst), value, n);
    return SUCCESS;
}

int cuMemsetD8_v2(std::uintptr_t dst, unsigned char value, std::size_t n) {
    return cuMemsetD8Async(dst, value, n, nullptr);
}

int cuMemcpyHtoDAsync_v2(std::uintptr_t dst, const void* src, std::size_t n, void*) {
    ++thread_calls;
    std::lock_guard<std::mutex> g(lock);
    if (!inside(dst, n)) return INVALID_VALUE;
    std::memcpy(reinterpret_cast<void*>(dst), src, n);
    return SUCCESS;
}

int cuMemcpyHtoD_v2(std::uintptr_t dst, const void* src, std::size_t n) {
    return cuMemcpyHtoDAsync_v2(dst, src, n, nullptr);
}

int cuMemcpyDtoHAsync_v2(void* dst, std::uintptr_t src, std::size_t n, void*) {
    ++thread_calls;
    std::lock_guard<std::mutex> g(lock);
    if (!inside(src, n)) return INVALID_VALUE;
    std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    return SUCCESS;
}

int cuMemcpyDtoH_v2(void* dst, std::uintptr_t src, std::size_t n) {
    return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr);
}

int cuMemcpyDtoDAsync_v2(std::uintptr_t dst, std::uintptr_t src, std::size_t n, void*) {
    ++thread_calls;
    std::lock_guard<std::mutex> g(lock);
    if (!inside(dst, n) || !inside(src, n)) return INVALID_VALUE;
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return SUCCESS;
}

int cuMemcpyDtoD_v2(std::uintptr_t dst, std::uintptr_t src, std::size_t n) {
    return cuMemcpyDtoDAsync_v2(dst, src, n, nullptr);
}

// The PTX is NVRTC's real output for the emulated architecture: its target is checked and its
// `.entry` names and parameter counts are what cuModuleGetFunction accepts.
int cuModuleLoadData(void** module, const void* image) {
    ++thread_calls;
    std::string ptx(static_cast<const char*>(image));
    std::string target = ".target sm_" + std::to_string(arch());
    if (ptx.find(target) == std::string::npos) {
        last_error = "PTX not built for sm_" + std::to_string(arch());
        return INVALID_IMAGE;
    }
    auto* m = new Module();
    for (std::size_t at = ptx.find(".entry "); at != std::string::npos; at = ptx.find(".entry ", at + 1)) {
        std::size_t start = at + 7, open = ptx.find('(', start), close = ptx.find(')', open);
        if (open == std::string::npos || close == std::string::npos) break;
        std::string name = ptx.substr(start, open - start);
        std::size_t count = 0;
        for (std::size_t p = ptx.find(".param", open); p != std::string::npos && p < close;
             p = ptx.find(".param", p + 1))
            ++count;
        std::string body = ptx.substr(close, ptx.find(".entry ", close) - close);
        bool barriers = body.find("bar.sync") != std::string::npos || body.find("barrier.sync") != std::string::npos ||
                        body.find("shfl.") != std::string::npos;
        m->entries[name] = Entry{count, barriers};
    }
    *module = m;
    return SUCCESS;
}

int cuModuleUnload(void* module) {
    ++thread_calls;
    delete static_cast<Module*>(module);
    return SUCCESS;
}

int cuModuleGetFunction(Function** f, void* module, const char* name) {
    ++thread_calls;
    auto* m = static_cast<Module*>(module);
    auto entry = m->entries.find(name);
    if (entry == m->entries.end()) return NOT_FOUND;
    for (const Kernel& k : KERNELS) {
        if (std::strcmp(k.name, name) == 0) {
            if (entry->second.params != k.arity) {
                last_error = std::string(name) + ": the PTX and the C++ build disagree on its parameters";
                return INVALID_IMAGE;
            }
            *f = new Function{&k, entry->second.barriers};  // lives as long as the process
            return SUCCESS;
        }
    }
    return NOT_FOUND;
}

int cuFuncGetAttribute(int* v, int, Function*) {
    ++thread_calls;
    *v = 0;
    return SUCCESS;
}

int cuLaunchKernel(Function* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared_bytes, void*, void** params, void** extra) {
    std::lock_guard<std::mutex> g(lock);
    if (params == nullptr || extra != nullptr || shared_bytes != 0) return INVALID_VALUE;
    ++thread_launches;
    std::string err = launch(*f->kernel, f->barriers, uint3{gx, gy, gz}, uint3{bx, by, bz}, params);
    running = nullptr;
    emu::current = nullptr;
    if (!err.empty()) {
        last_error = err;
        std::fprintf(stderr, "cuda emulator: %s\n", err.c_str());
        return LAUNCH_FAILED;
    }
    return SUCCESS;
}

int cuGetErrorName(int code, const char** s) {
    ++thread_calls;
    switch (code) {
        case SUCCESS: *s = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
        case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN";
    }
    return SUCCESS;
}

int cuGetErrorString(int code, const char** s) {
    ++thread_calls;
    if (code == LAUNCH_FAILED || code == INVALID_IMAGE) {
        *s = last_error.c_str();
        return SUCCESS;
    }
    return cuGetErrorName(code, s);
}

// Not part of the driver: how many allocations, launches and driver calls of any kind the
// calling thread has made.
void lathe_emulator_counts(unsigned long* allocations, unsigned long* launches, unsigned long* calls) {
    *allocations = thread_allocations;
    *launches = thread_launches;
    *calls = thread_calls;
}

// Not part of the driver: the priority the last stream was made with.
int lathe_emulator_stream_priority() {
    std::lock_guard<std::mutex> guard(lock);
    return last_stream_priority;
}

}  // extern "C"
