// cuda_builtins.h: just enough of CUDA C for lathe's kernels (cuda/*.cu) to compile as C++ and
// run on the CPU, with CUDA's semantics: every thread of a block is a fiber (ucontext), blocks
// run one after another, `__syncthreads()` and the warp shuffles are real barriers between the
// block's fibers, `__shared__` memory is one copy per block. Force-included (`g++ -include`)
// before each kernel file by `libcuda.cpp`; see README.md here for what it is for.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

struct uint3 {
    unsigned x, y, z;
};

namespace emu {
// The fiber running now: its thread index within the block.
struct Thread;
extern Thread* current;
const uint3& thread_idx();
extern uint3 block_idx, block_dim, grid_dim;
void sync_block();
float shfl_down(float v, int offset);
float atomic_add(float* p, float v);
}  // namespace emu

#define __global__
#define __device__
#define __forceinline__ inline
// One block runs at a time, so a function-local static is exactly one copy per block.
#define __shared__ static
#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __syncthreads() emu::sync_block()
#define __shfl_down_sync(mask, v, offset) emu::shfl_down((v), (offset))
#define atomicAdd(p, v) emu::atomic_add((p), (v))
