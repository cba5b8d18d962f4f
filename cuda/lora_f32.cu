// lora_f32: what LoRA needs beyond the dense ops. The adapter's backward is GEMMs (gemm_f32
// with transposes) and its update is the optimizer's; its forward needs the frozen weight with
// the adapter merged in, each step and for export, which is this kernel:
//
// lora_merge_f32:  out[r,c] = w[r,c] + scale · Σ_k a[r,k]·b[k,c]   (w, out rows×cols; a rows×rank;
//                  b rank×cols; scale = alpha / rank)              grid ceil(rows·cols/256), block 256
#include "common.cuh"

extern "C" __global__ void lora_merge_f32(const float* w, const float* a, const float* b, float* out, int rows,
                                          int cols, int rank, float scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * cols) return;
    int r = (int)(i / cols), c = (int)(i % cols);
    float acc = 0.0f;
    for (int k = 0; k < rank; ++k) acc += a[(size_t)r * rank + k] * b[(size_t)k * cols + c];
    out[i] = w[i] + scale * acc;
}
