// The kernels over quantised weights (block decoding in quant_blocks.cuh, compiled after it).

// Activations [n][cols] f32 into Q8 blocks [n][cols / 32], as quant::dot::quantize_q8_scalar:
// d = max|x| / 127, q = round-half-even(x * 127 / max|x|), sum = d * sum(q). A warp per block.
extern "C" __global__ void quantize_q8(const float* x, Q8Act* out, int n_blocks) {
    int blk = (int)((blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (blk >= n_blocks) return;
    float v = x[(long)blk * 32 + lane];
    float amax = warp_max(fabsf(v));
    float d = amax / 127.0f;
    float id = d > 0.0f ? 127.0f / amax : 0.0f;
    int q = __float2int_rn(v * id);
    int s = q;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    ((signed char*)out[blk].qs)[lane] = (signed char)q;
    if (lane == 0) {
        out[blk].d = d;
        out[blk].sum = d * (float)s;
    }
}

#define GEMV_Q_MAX_N 8
// Sub-blocks each lane loads before it uses any: a row of 4096 values is 128 sub-blocks, so a
// warp issues the whole row at once (at two in flight it was 28-48% of the bandwidth, H200).
#define GEMV_Q_IN_FLIGHT 4

// y[t][r] = W[r] . x[t] for n <= N activation rows quantised to Q8 (xq [n][cols / 32]): a warp
// per output row, each lane GEMV_Q_IN_FLIGHT sub-blocks at a time; the weight is read once
// for all n rows. N = 1 (a single sequence's step) needs one accumulator, not 8: fewer
// registers, more warps per SM.
template <int T, int N>
__device__ void gemv_q(const GemvWeights& ws, const Q8Act* xq, int cols, int n) {
    const unsigned char* w = (const unsigned char*)pick(ws.w, blockIdx.y);
    float* y = pick(ws.y, blockIdx.y);
    int rows = pick(ws.rows, blockIdx.y);
    int r = (int)((blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const unsigned char* wr = w + (long)r * row_bytes<T>(cols);
    int nsub = cols >> 5;
    float acc[N];
#pragma unroll
    for (int t = 0; t < N; t++) acc[t] = 0.0f;
    for (int j0 = lane; j0 < nsub; j0 += 32 * GEMV_Q_IN_FLIGHT) {
        Sub32 s[GEMV_Q_IN_FLIGHT];
#pragma unroll
        for (int u = 0; u < GEMV_Q_IN_FLIGHT; u++)
            if (j0 + 32 * u < nsub) s[u] = load_sub<T>(wr, j0 + 32 * u);
#pragma unroll
        for (int u = 0; u < GEMV_Q_IN_FLIGHT; u++) {
            int j = j0 + 32 * u;
            if (j >= nsub) break;
#pragma unroll
            for (int t = 0; t < N; t++) {
                if (t >= n) break;
                acc[t] += sub_dot(s[u], xq[(long)t * nsub + j]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < N; t++) {
        if (t >= n) break;
        float v = warp_sum(acc[t]);
        if (lane == 0) y[(long)t * rows + r] = v;
    }
}

// Q4_K and Q5_K times one activation row: a warp per two output rows, each lane a pair of
// sub-blocks of both rows, the pair's activations read once for the two. (A lane per sub-block
// read each nibble byte twice and the activations once per row: L1's bytes, not DRAM's, set
// the pace there.) The integer sums are load_sub's; only the float order differs.
#define GEMV_PAIRS_IN_FLIGHT 1
template <int T>
__device__ void gemv_pairs(const GemvWeights& ws, const Q8Act* xq, int cols) {
    const unsigned char* w = (const unsigned char*)pick(ws.w, blockIdx.y);
    float* y = pick(ws.y, blockIdx.y);
    int rows = pick(ws.rows, blockIdx.y);
    int r0 = 2 * (int)((blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (r0 >= rows) return;
    long rb = row_bytes<T>(cols);
    const unsigned char* w0 = w + (long)r0 * rb;
    const unsigned char* w1 = w + (long)min(r0 + 1, rows - 1) * rb;
    int npairs = cols >> 6;
    float acc0 = 0.0f, acc1 = 0.0f;
    for (int p0 = lane; p0 < npairs; p0 += 32 * GEMV_PAIRS_IN_FLIGHT) {
        Sub32 a_lo[GEMV_PAIRS_IN_FLIGHT], a_hi[GEMV_PAIRS_IN_FLIGHT], b_lo[GEMV_PAIRS_IN_FLIGHT],
            b_hi[GEMV_PAIRS_IN_FLIGHT];
#pragma unroll
        for (int u = 0; u < GEMV_PAIRS_IN_FLIGHT; u++) {
            if (p0 + 32 * u < npairs) {
                load_pair<T>(w0, p0 + 32 * u, a_lo[u], a_hi[u]);
                load_pair<T>(w1, p0 + 32 * u, b_lo[u], b_hi[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < GEMV_PAIRS_IN_FLIGHT; u++) {
            int p = p0 + 32 * u;
            if (p >= npairs) break;
            const Q8Act& x0 = xq[2 * p];
            const Q8Act& x1 = xq[2 * p + 1];
            acc0 += sub_dot(a_lo[u], x0) + sub_dot(a_hi[u], x1);
            acc1 += sub_dot(b_lo[u], x0) + sub_dot(b_hi[u], x1);
        }
    }
    acc0 = warp_sum(acc0);
    acc1 = warp_sum(acc1);
    if (lane == 0) {
        y[r0] = acc0;
        if (r0 + 1 < rows) y[r0 + 1] = acc1;
    }
}

// Rows row0 .. row0 + n_rows of W as f16 into out [n_rows][cols] (a tile for cuBLAS), a thread
// per sub-block.
template <int T>
__device__ void dequant_f16(const unsigned char* w, unsigned short* out, int cols, int row0, int n_rows) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    int nsub = cols >> 5;
    if (i >= (long)n_rows * nsub) return;
    int r = (int)(i / nsub), j = (int)(i % nsub);
    Sub32 s = load_sub<T>(w + (long)(row0 + r) * row_bytes<T>(cols), j);
    // 16-byte stores (eight values each): two-byte stores 64 bytes apart made a batch of 16
    // on Q4_K weights 7x slower than 8 rows through the GEMV (H100).
    uint4* o = (uint4*)(out + (long)r * cols + 32 * j);
#pragma unroll
    for (int q = 0; q < 4; q++) {
        unsigned h[8];
#pragma unroll
        for (int v = 0; v < 8; v++) h[v] = f2h(sub_value(s, 8 * q + v));
        o[q] = make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16), h[6] | (h[7] << 16));
    }
}

// out[t] = W[tokens[t]] in f32 (an embedding lookup): block t, a thread per sub-block.
template <int T>
__device__ void embed_q(const unsigned char* w, const unsigned int* tokens, float* out, int cols) {
    const unsigned char* wr = w + (long)tokens[blockIdx.x] * row_bytes<T>(cols);
    float* o = out + (long)blockIdx.x * cols;
    for (int j = threadIdx.x; j < (cols >> 5); j += blockDim.x) {
        Sub32 s = load_sub<T>(wr, j);
#pragma unroll
        for (int i = 0; i < 32; i++) o[32 * j + i] = sub_value(s, i);
    }
}

#define QUANT_KERNELS(T, NAME)                                                                              \
    extern "C" __global__ void gemv_##NAME(GemvWeights ws, const Q8Act* xq, int cols, int n) {              \
        gemv_q<T, GEMV_Q_MAX_N>(ws, xq, cols, n);                                                           \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(256, 4) gemv1_##NAME(GemvWeights ws, const Q8Act* xq, int cols, int n) {             \
        if (T == 12 || T == 13)                                                                             \
            gemv_pairs<T>(ws, xq, cols);                                                                    \
        else                                                                                                \
            gemv_q<T, 1>(ws, xq, cols, n);                                                                  \
    }                                                                                                       \
    extern "C" __global__ void dequant_f16_##NAME(const unsigned char* w, unsigned short* out, int cols,    \
                                                  int row0, int n_rows) {                                   \
        dequant_f16<T>(w, out, cols, row0, n_rows);                                                         \
    }                                                                                                       \
    extern "C" __global__ void embed_##NAME(const unsigned char* w, const unsigned int* tokens, float* out, \
                                            int cols) {                                                     \
        embed_q<T>(w, tokens, out, cols);                                                                   \
    }

QUANT_KERNELS(2, q4_0)
QUANT_KERNELS(3, q4_1)
QUANT_KERNELS(6, q5_0)
QUANT_KERNELS(7, q5_1)
QUANT_KERNELS(8, q8_0)
QUANT_KERNELS(12, q4_k)
QUANT_KERNELS(13, q5_k)
QUANT_KERNELS(14, q6_k)
