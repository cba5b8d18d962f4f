// common.cuh: what every lathe kernel shares. Inlined by the Rust side before NVRTC compiles a
// file (NVRTC has no include path to this folder), so each .cu stays one compilation unit.
//
// Activation codes match `train::backend::Activation`: 0 ReLU, 1 LeakyReLU(slope), 2 Sigmoid,
// 3 Tanh (softmax has its own row kernels).
#pragma once

#define ACT_RELU 0
#define ACT_LEAKY_RELU 1
#define ACT_SIGMOID 2
#define ACT_TANH 3

// Threads per block for the element-wise and reduction kernels.
#define LATHE_BLOCK 256

__device__ __forceinline__ float lathe_sigmoid(float x) {
    return x >= 0.0f ? 1.0f / (1.0f + expf(-x)) : expf(x) / (1.0f + expf(x));
}

__device__ __forceinline__ float lathe_act(int act, float slope, float x) {
    switch (act) {
        case ACT_RELU: return x > 0.0f ? x : 0.0f;
        case ACT_LEAKY_RELU: return x >= 0.0f ? x : slope * x;
        case ACT_SIGMOID: return lathe_sigmoid(x);
        default: return tanhf(x);
    }
}

// d act / dx from the forward input x and output y.
__device__ __forceinline__ float lathe_act_grad(int act, float slope, float x, float y) {
    switch (act) {
        case ACT_RELU: return x > 0.0f ? 1.0f : 0.0f;
        case ACT_LEAKY_RELU: return x > 0.0f ? 1.0f : slope;
        case ACT_SIGMOID: return y * (1.0f - y);
        default: return 1.0f - y * y;
    }
}

// Sum of `v` over a block of LATHE_BLOCK threads; the result is valid in thread 0.
__device__ __forceinline__ float lathe_block_sum(float v, float* shared) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (LATHE_BLOCK >> 5)) ? shared[lane] : 0.0f;
    if (warp == 0) {
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
    }
    return v;
}
