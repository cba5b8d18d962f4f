// layer_f32: a dense layer's element-wise parts, forward and backward. Its fused forward and
// backward (dense_f32, dense_backward_f32 in gemm_f32.cu) use these only for softmax, whose
// rows need a kernel of their own; the rest serve a layer's further activations and the
// trait's separate ops.
//
// add_bias_f32:        y[r,c] += bias[c]                          grid ceil(rows·cols/256), block 256
// activation_f32:      y = act(x)                                  grid ceil(n/256), block 256
// activation_grad_f32: dx = dy · act'(x, y)                        grid ceil(n/256), block 256
// softmax_rows_f32:    y[r,:] = softmax(x[r,:])                    grid rows, block 1 (classes are few)
// softmax_grad_f32:    dx[r,c] = y[r,c]·(dy[r,c] − Σ_j y[r,j]·dy[r,j])   grid rows, block 1
// bias_grad_f32:       db[c] = Σ_r dy[r,c]                         grid cols, block 256 (one block per column)
#include "common.cuh"

extern "C" __global__ void add_bias_f32(float* y, const float* bias, int rows, int cols) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)rows * cols) y[i] += bias[i % cols];
}

extern "C" __global__ void activation_f32(const float* x, float* y, int n, int act, float slope) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) y[i] = lathe_act(act, slope, x[i]);
}

extern "C" __global__ void activation_grad_f32(const float* x, const float* y, const float* dy, float* dx, int n, int act,
                                               float slope) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) dx[i] = dy[i] * lathe_act_grad(act, slope, x[i], y[i]);
}

extern "C" __global__ void softmax_rows_f32(const float* x, float* y, int rows, int cols) {
    int r = blockIdx.x;
    if (r >= rows || threadIdx.x != 0) return;
    const float* xr = x + (size_t)r * cols;
    float* yr = y + (size_t)r * cols;
    float mx = xr[0];
    for (int c = 1; c < cols; ++c) mx = fmaxf(mx, xr[c]);
    float z = 0.0f;
    for (int c = 0; c < cols; ++c) {
        yr[c] = expf(xr[c] - mx);
        z += yr[c];
    }
    for (int c = 0; c < cols; ++c) yr[c] /= z;
}

extern "C" __global__ void softmax_grad_f32(const float* y, const float* dy, float* dx, int rows, int cols) {
    int r = blockIdx.x;
    if (r >= rows || threadIdx.x != 0) return;
    size_t o = (size_t)r * cols;
    float dot = 0.0f;
    for (int c = 0; c < cols; ++c) dot += y[o + c] * dy[o + c];
    for (int c = 0; c < cols; ++c) dx[o + c] = y[o + c] * (dy[o + c] - dot);
}

extern "C" __global__ void bias_grad_f32(const float* dy, float* db, int rows, int cols) {
    __shared__ float shared[LATHE_BLOCK / 32];
    int c = blockIdx.x;
    if (c >= cols) return;
    float v = 0.0f;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) v += dy[(size_t)r * cols + c];
    v = lathe_block_sum(v, shared);
    if (threadIdx.x == 0) db[c] = v;
}
