// loss_f32: losses and their gradients with respect to the model's output, as
// `train::backend::Loss` defines them. Each kernel writes the unnormalized gradient and, per
// row or element, the weighted loss and its weight into `parts` (2 floats each); reduce_pairs_f32
// sums them so the host reads (Σ w·loss, Σ w) once and scales the gradient by 1/Σ w.
//
// mse_f32:            grad = 2(out − t)/n; parts = ((out − t)², 1)             grid ceil(n/256), block 256
// bce_logits_f32:     grad = w·(σ(x) − t); parts = (w·(max(x,0) − x·t + log1p(e^−|x|)), w)
//                     w = class_w[t] (or 1)                                     grid ceil(n/256), block 256
// softmax_xent_f32:   grad[r,:] = w·(softmax(x[r,:]) − onehot(t[r])); parts = (w·(logΣe^x − x[t]), w)
//                     t[r] is the class index as a float                       grid rows, block 1
// reduce_pairs_f32:   out[0] += Σ parts[2i], out[1] += Σ parts[2i+1]            grid ceil(n/256), block 256
//                     (out zeroed first; atomicAdd across blocks)
#include "common.cuh"

extern "C" __global__ void mse_f32(const float* out, const float* t, float* grad, float* parts, int n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) {
        float d = out[i] - t[i];
        grad[i] = 2.0f * d / (float)n;
        parts[2 * i] = d * d;
        parts[2 * i + 1] = 1.0f;
    }
}

extern "C" __global__ void bce_logits_f32(const float* out, const float* t, const float* class_w, int weighted, float* grad,
                                          float* parts, int n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) {
        float x = out[i], y = t[i];
        float w = weighted ? class_w[y >= 0.5f ? 1 : 0] : 1.0f;
        grad[i] = w * (lathe_sigmoid(x) - y);
        parts[2 * i] = w * (fmaxf(x, 0.0f) - x * y + log1pf(expf(-fabsf(x))));
        parts[2 * i + 1] = w;
    }
}

extern "C" __global__ void softmax_xent_f32(const float* out, const float* t, const float* class_w, int weighted,
                                            float* grad, float* parts, int rows, int cols) {
    int r = blockIdx.x;
    if (r >= rows || threadIdx.x != 0) return;
    const float* x = out + (size_t)r * cols;
    float* g = grad + (size_t)r * cols;
    int cls = (int)t[r];
    float w = weighted ? class_w[cls] : 1.0f;
    float mx = x[0];
    for (int c = 1; c < cols; ++c) mx = fmaxf(mx, x[c]);
    float z = 0.0f;
    for (int c = 0; c < cols; ++c) {
        g[c] = expf(x[c] - mx);
        z += g[c];
    }
    for (int c = 0; c < cols; ++c) g[c] = w * (g[c] / z - (c == cls ? 1.0f : 0.0f));
    parts[2 * r] = w * (logf(z) + mx - x[cls]);
    parts[2 * r + 1] = w;
}

extern "C" __global__ void reduce_pairs_f32(const float* parts, float* out, int n) {
    __shared__ float shared[LATHE_BLOCK / 32];
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    float a = i < (size_t)n ? parts[2 * i] : 0.0f;
    float b = i < (size_t)n ? parts[2 * i + 1] : 0.0f;
    a = lathe_block_sum(a, shared);
    __syncthreads();
    b = lathe_block_sum(b, shared);
    if (threadIdx.x == 0) {
        atomicAdd(out, a);
        atomicAdd(out + 1, b);
    }
}
