// lora_f32: what LoRA needs beyond the dense ops. The adapter's forward and backward are GEMMs
// (x·Aᵀ·Bᵀ, gemm_f32 with transposes) and its update is the optimizer's; merging it into the
// frozen weight for export is this kernel:
//
// lora_merge_f32:  w[r,c] += scale · Σ_k b[r,k]·a[k,c]   (w rows×cols, b rows×rank, a rank×cols,
//                  scale = alpha / rank)                   grid ceil(rows·cols/256), block 256
#include "common.cuh"

extern "C" __global__ void lora_merge_f32(float* w, const float* a, const float* b, int rows, int cols, int rank,
                                          float scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * cols) return;
    int r = (int)(i / cols), c = (int)(i % cols);
    float acc = 0.0f;
    for (int k = 0; k < rank; ++k) acc += b[(size_t)r * rank + k] * a[(size_t)k * cols + c];
    w[i] += scale * acc;
}
