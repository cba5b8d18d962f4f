// gemm_f32: C = alpha · op(A) · op(B) + beta · C, row-major, op(A) m×k and op(B) k×n.
// trans_a: A is stored k×m; trans_b: B is stored n×k (PyTorch's nn.Linear weight is n×k).
// Tiled in shared memory, TILE×TILE outputs per block, one per thread.
// Launch: grid (ceil(n/TILE), ceil(m/TILE)), block (TILE, TILE).
//
// dense_f32: a dense layer's whole forward in one kernel, the GEMM with the bias and the
// activation in its epilogue: z = x · w + bias (x m×k, w k×n; bias optional), y = act(z)
// (no y when act < 0: a layer without activation). z keeps the pre-activation for the
// backward. Same tiling and launch as gemm_f32.
//
// dense_backward_f32: a dense layer's whole backward in one kernel. From dy, the gradient at
// the activation's output: dz = dy · act'(z, y) (dz = dy when act < 0: no activation),
// dw = xᵀ · dz (k×n), db = Σ_r dz[r,:] (n) and dx = dz · wᵀ (m×k). Two GEMMs in one grid, a
// 1-D run of TILE×TILE blocks: first dw_rows × ceil(n/TILE) tiles of dw, then
// ceil(m/TILE) × ceil(k/TILE) tiles of dx (none when has_dx is 0). dw_rows is ceil(k/TILE), or
// 1 when only db is wanted. Both halves compute dz as they load it, so it is never stored and
// the two halves need no ordering; the dw tiles of the first tile row sum db as they go.
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
        if (act >= 0) y[o] = lathe_act(act, slope, v);
    }
}

// dz at [r, c], from the upstream gradient and the forward's pre-activation z and output y.
__device__ __forceinline__ float lathe_dz(const float* __restrict__ dy, const float* __restrict__ z,
                                          const float* __restrict__ y, size_t o, int act, float slope) {
    return act < 0 ? dy[o] : dy[o] * lathe_act_grad(act, slope, z[o], y[o]);
}

extern "C" __global__ void dense_backward_f32(const float* __restrict__ x, const float* __restrict__ w,
                                              const float* __restrict__ z, const float* __restrict__ y,
                                              const float* __restrict__ dy, float* __restrict__ dw,
                                              float* __restrict__ db, float* __restrict__ dx, int m, int n, int k,
                                              int act, float slope, int dw_rows, int has_dw, int has_db,
                                              int has_dx) {
    __shared__ float as[TILE][TILE];
    __shared__ float bs[TILE][TILE + 1];
    int tx = threadIdx.x, ty = threadIdx.y;
    int n_tiles = (n + TILE - 1) / TILE;
    int tile = blockIdx.x;
    float acc = 0.0f;
    if (tile < dw_rows * n_tiles) {
        // dw[i, j] = Σ_r x[r, i] · dz[r, j]: A = xᵀ (k×m), B = dz (m×n).
        int ti = tile / n_tiles;
        int i = ti * TILE + ty, j = (tile % n_tiles) * TILE + tx;
        int bias_sum = has_db && ti == 0 && ty == 0;  // one thread per column of the first tile row
        float bias = 0.0f;
        for (int t = 0; t < m; t += TILE) {
            int ra = t + tx, rb = t + ty;  // the rows of x and dz this thread loads
            as[ty][tx] = (i < k && ra < m) ? x[(size_t)ra * k + i] : 0.0f;
            bs[ty][tx] = (j < n && rb < m) ? lathe_dz(dy, z, y, (size_t)rb * n + j, act, slope) : 0.0f;
            __syncthreads();
#pragma unroll
            for (int q = 0; q < TILE; ++q) acc += as[ty][q] * bs[q][tx];
            if (bias_sum)
                for (int q = 0; q < TILE; ++q) bias += bs[q][tx];
            __syncthreads();
        }
        if (has_dw && i < k && j < n) dw[(size_t)i * n + j] = acc;
        if (bias_sum && j < n) db[j] = bias;
        return;
    }
    if (!has_dx) return;
    // dx[r, i] = Σ_j dz[r, j] · w[i, j]: A = dz (m×n), B = wᵀ (n×k).
    tile -= dw_rows * n_tiles;
    int k_tiles = (k + TILE - 1) / TILE;
    int r = (tile / k_tiles) * TILE + ty, i = (tile % k_tiles) * TILE + tx;
    for (int t = 0; t < n; t += TILE) {
        int ja = t + tx, jb = t + ty;  // the columns of dz and w this thread loads
        as[ty][tx] = (r < m && ja < n) ? lathe_dz(dy, z, y, (size_t)r * n + ja, act, slope) : 0.0f;
        bs[ty][tx] = (i < k && jb < n) ? w[(size_t)i * n + jb] : 0.0f;
        __syncthreads();
#pragma unroll
        for (int q = 0; q < TILE; ++q) acc += as[ty][q] * bs[q][tx];
        __syncthreads();
    }
    if (r < m && i < k) dx[(size_t)r * k + i] = acc;
}
