// gemm_f32: C = alpha · op(A) · op(B) + beta · C, row-major, op(A) m×k and op(B) k×n.
// trans_a: A is stored k×m; trans_b: B is stored n×k (PyTorch's nn.Linear weight is n×k).
// Tiled in shared memory, TILE×TILE outputs per block, one per thread.
// Launch: grid (ceil(n/TILE), ceil(m/TILE)), block (TILE, TILE).
//
// dense_f32: a dense layer's whole forward in one kernel, the GEMM with the bias and the
// activation in its epilogue: z = x · w + bias (x m×k, w k×n; bias optional), y = act(z).
// z keeps the pre-activation for the backward. Same tiling and launch as gemm_f32.
#include "common.cuh"

#define TILE 16

// One output of op(A) · op(B): row, col of this thread; every thread of the block must call it
// (it synchronizes), also those outside the matrix.
__device__ __forceinline__ float lathe_tile_dot(const float* __restrict__ a, const float* __restrict__ b, int m, int n,
                                                int k, int trans_a, int trans_b, int row, int col,
                                                float (*as)[TILE], float (*bs)[TILE + 1]) {
    float acc = 0.0f;
    for (int t = 0; t < k; t += TILE) {
        int ka = t + threadIdx.x;  // A's column this thread loads
        int kb = t + threadIdx.y;  // B's row this thread loads
        float av = 0.0f, bv = 0.0f;
        if (row < m && ka < k) av = trans_a ? a[(size_t)ka * m + row] : a[(size_t)row * k + ka];
        if (col < n && kb < k) bv = trans_b ? b[(size_t)col * k + kb] : b[(size_t)kb * n + col];
        as[threadIdx.y][threadIdx.x] = av;
        bs[threadIdx.y][threadIdx.x] = bv;
        __syncthreads();
#pragma unroll
        for (int i = 0; i < TILE; ++i) acc += as[threadIdx.y][i] * bs[i][threadIdx.x];
        __syncthreads();
    }
    return acc;
}

extern "C" __global__ void gemm_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c,
                                    int m, int n, int k, int trans_a, int trans_b, float alpha, float beta) {
    __shared__ float as[TILE][TILE];
    __shared__ float bs[TILE][TILE + 1];
    int row = blockIdx.y * TILE + threadIdx.y;
    int col = blockIdx.x * TILE + threadIdx.x;
    float acc = lathe_tile_dot(a, b, m, n, k, trans_a, trans_b, row, col, as, bs);
    if (row < m && col < n) {
        size_t o = (size_t)row * n + col;
        c[o] = alpha * acc + (beta == 0.0f ? 0.0f : beta * c[o]);
    }
}

extern "C" __global__ void dense_f32(const float* __restrict__ x, const float* __restrict__ w,
                                     const float* __restrict__ bias, int has_bias, float* __restrict__ z,
                                     float* __restrict__ y, int m, int n, int k, int act, float slope) {
    __shared__ float as[TILE][TILE];
    __shared__ float bs[TILE][TILE + 1];
    int row = blockIdx.y * TILE + threadIdx.y;
    int col = blockIdx.x * TILE + threadIdx.x;
    float acc = lathe_tile_dot(x, w, m, n, k, 0, 0, row, col, as, bs);
    if (row < m && col < n) {
        size_t o = (size_t)row * n + col;
        float v = acc + (has_bias ? bias[col] : 0.0f);
        z[o] = v;
        y[o] = lathe_act(act, slope, v);
    }
}
