// optim_f32: optimizer steps (PyTorch's torch.optim definitions) and what gradient clipping
// needs.
//
// The optimizer and clipping run over every parameter tensor of a net in one launch (a small
// MLP's step is launch-bound): `table` holds per tensor its device pointers and length as
// u64s, and tensor t is blockIdx.y. A single tensor is a table of one.
//
// sgd_all_f32:      g += wd·p; m = momentum·m + g; p −= lr·(momentum ≠ 0 ? m : g)
// adam_all_f32:     g += l2·p; p *= decay; m = b1·m + (1−b1)g; v = b2·v + (1−b2)g²;
//                   p −= step·m / (√v / bc2_sqrt + eps)
//                   (Adam: l2 = wd, decay = 1; AdamW: l2 = 0, decay = 1 − lr·wd;
//                   step = lr / (1 − b1^t), bc2_sqrt = √(1 − b2^t))
//                   both: table[5t..5t+5] = (param, grad, m, v, len)
// sum_squares_all_f32:  out[0] += Σ over tensors of Σ x² (out zeroed first); table[2t..2t+2] = (x, len)
// clip_all_f32:     x *= max_norm / (√sum_sq[0] + 1e-6) when that is below 1 (clip_grad_norm_,
//                   the norm read on the device: the host never waits for it); table as above
//                   all four: grid (ceil(longest/256), tensors), block 256
//
// scale_f32:        x *= factor                                                  grid ceil(n/256), block 256
// sum_squares_f32:  out[0] += Σ x² (out zeroed first; atomicAdd across blocks)  grid ceil(n/256), block 256
#include "common.cuh"

// Tensor blockIdx.y's k-th pointer in a table `width` u64s wide.
#define LATHE_TENSOR(table, width, k) ((float*)(table)[(size_t)blockIdx.y * (width) + (k)])

extern "C" __global__ void sgd_all_f32(const unsigned long long* table, int tensors, float lr, float momentum, float wd) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if ((int)blockIdx.y >= tensors || i >= table[(size_t)blockIdx.y * 5 + 4]) return;
    float *p = LATHE_TENSOR(table, 5, 0), *g = LATHE_TENSOR(table, 5, 1), *m = LATHE_TENSOR(table, 5, 2);
    float gi = g[i] + wd * p[i];
    m[i] = momentum * m[i] + gi;
    p[i] -= lr * (momentum != 0.0f ? m[i] : gi);
}

extern "C" __global__ void adam_all_f32(const unsigned long long* table, int tensors, float b1, float b2, float eps,
                                        float l2, float decay, float step, float bc2_sqrt) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if ((int)blockIdx.y >= tensors || i >= table[(size_t)blockIdx.y * 5 + 4]) return;
    float *p = LATHE_TENSOR(table, 5, 0), *g = LATHE_TENSOR(table, 5, 1);
    float *m = LATHE_TENSOR(table, 5, 2), *v = LATHE_TENSOR(table, 5, 3);
    float gi = g[i] + l2 * p[i];
    float pi = p[i] * decay;
    float mi = b1 * m[i] + (1.0f - b1) * gi;
    float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - step * mi / (sqrtf(vi) / bc2_sqrt + eps);
}

extern "C" __global__ void sum_squares_all_f32(const unsigned long long* table, int tensors, float* out) {
    __shared__ float shared[LATHE_BLOCK / 32];
    // Whole blocks leave together (the block sum needs every thread of the block).
    if ((int)blockIdx.y >= tensors) return;
    size_t n = table[(size_t)blockIdx.y * 2 + 1];
    if ((size_t)blockIdx.x * blockDim.x >= n) return;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const float* x = LATHE_TENSOR(table, 2, 0);
    float v = i < n ? x[i] * x[i] : 0.0f;
    v = lathe_block_sum(v, shared);
    if (threadIdx.x == 0) atomicAdd(out, v);
}

extern "C" __global__ void clip_all_f32(const unsigned long long* table, int tensors, const float* sum_sq,
                                        float max_norm) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if ((int)blockIdx.y >= tensors || i >= table[(size_t)blockIdx.y * 2 + 1]) return;
    float coef = max_norm / (sqrtf(sum_sq[0]) + 1e-6f);
    if (coef < 1.0f) LATHE_TENSOR(table, 2, 0)[i] *= coef;
}

extern "C" __global__ void scale_f32(float* x, int n, float factor) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) x[i] *= factor;
}

extern "C" __global__ void sum_squares_f32(const float* x, float* out, int n) {
    __shared__ float shared[LATHE_BLOCK / 32];
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < (size_t)n ? x[i] * x[i] : 0.0f;
    v = lathe_block_sum(v, shared);
    if (threadIdx.x == 0) atomicAdd(out, v);
}
