// The CUDA backend's kernels, compiled at run time by NVRTC for the GPU found.
//
// Layouts (row-major): activations f32 [rows][dim]; weights and KV f16 stored as unsigned
// short; a KV head's storage [capacity][head_dim] and its slot positions u32 [capacity]
// (FREE_SLOT = empty). Decode attention for one query position: queries [n_heads][head_dim],
// query head h reads KV head h / group.
// No headers: NVRTC needs none for this file (f16 conversions are single PTX instructions).

#define FREE_SLOT 0xffffffffu
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reduction (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_reduce(float v, bool is_max) {
    __shared__ float partial[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int n = blockDim.x >> 5;
        float w = lane < n ? partial[lane] : (is_max ? NEG_INF : 0.0f);
        w = is_max ? warp_max(w) : warp_sum(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight; one block per row.
extern "C" __global__ void rms_norm(const float* x, const float* weight, float* out, int dim, float eps) {
    const float* row = x + (size_t)blockIdx.x * dim;
    float s = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += row[i] * row[i];
    s = block_reduce(s, false);
    float inv = rsqrtf(s / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        out[(size_t)blockIdx.x * dim + i] = row[i] * inv * weight[i];
}

// RoPE on adjacent pairs (x[2i], x[2i+1]) of the first rope_dim values of every head, by the
// row's position; one thread per pair. x: [rows][n_heads * head_dim].
extern "C" __global__ void rope_adjacent_pairs(float* x, const unsigned* positions, const float* inv_freq,
                                               int rows, int n_heads, int head_dim, int rope_pairs) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long per_row = (long)n_heads * rope_pairs;
    if (i >= rows * per_row) return;
    int r = i / per_row, rest = i % per_row, h = rest / rope_pairs, p = rest % rope_pairs;
    float s, c;
    sincosf((float)positions[r] * inv_freq[p], &s, &c);
    float* v = x + (size_t)r * n_heads * head_dim + h * head_dim + 2 * p;
    float a = v[0], b = v[1];
    v[0] = a * c - b * s;
    v[1] = a * s + b * c;
}

// gate = silu(gate) * up.
extern "C" __global__ void silu_mul(float* gate, const float* up, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

extern "C" __global__ void f32_to_f16(const float* x, unsigned short* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f2h(x[i]);
}

// logits[h][s] = scale * q[h] . k[s] for the query heads of KV head blockIdx.y, or -inf where
// slot s is free or holds a position after the query's. One warp per slot: the key is read
// once for the whole group of query heads.
extern "C" __global__ void attn_logits(const float* q, const unsigned short* keys, const unsigned* slot_pos,
                                       float* logits, int n_heads, int n_kv_heads, int head_dim, int capacity,
                                       int width, unsigned query_pos, float scale) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int s = blockIdx.x * (blockDim.x >> 5) + warp;
    int g = blockIdx.y, group = n_heads / n_kv_heads;
    if (s >= width) return;
    unsigned p = slot_pos[(size_t)g * capacity + s];
    bool visible = p != FREE_SLOT && p <= query_pos;
    const unsigned short* k = keys + ((size_t)g * capacity + s) * head_dim;
    for (int j = 0; j < group; j++) {
        int h = g * group + j;
        const float* qh = q + (size_t)h * head_dim;
        float d = 0.0f;
        for (int i = lane; i < head_dim; i += 32) d += qh[i] * h2f(k[i]);
        d = warp_sum(d);
        if (lane == 0) logits[(size_t)h * width + s] = visible ? d * scale : NEG_INF;
    }
}

// The position hash of the noise (keyformer_kv::noise::position_hash): murmur3's finaliser
// of position * golden ^ key.
__device__ __forceinline__ unsigned position_hash(unsigned key, unsigned position) {
    unsigned x = position * 0x9E3779B9u ^ key;
    x ^= x >> 16;
    x *= 0x85EBCA6Bu;
    x ^= x >> 13;
    x *= 0xC2B2AE35u;
    return x ^ (x >> 16);
}

// Softmax of each query head's row, written to probs[h][s]. noisy = 0: of the logits (what
// attention uses); noisy = 1: of (logit + g) / tau, g the Gumbel draw of the slot's position
// under the row key keys[h] from the quantile table (Keyformer's score), as the CPU draws
// it. One block per query head.
extern "C" __global__ void softmax_rows(const float* logits, const unsigned* slot_pos, float* probs, int n_heads,
                                        int n_kv_heads, int capacity, int width, int noisy, float tau,
                                        const unsigned* row_keys, const float* gumbel_table, int table_bits) {
    int h = blockIdx.x, g = h / (n_heads / n_kv_heads);
    const float* x = logits + (size_t)h * width;
    float* y = probs + (size_t)h * width;
    const unsigned* pos = slot_pos + (size_t)g * capacity;
    float inv_tau = 1.0f / tau;
    unsigned key = noisy ? row_keys[h] : 0u;
    float m = NEG_INF;
    for (int s = threadIdx.x; s < width; s += blockDim.x) {
        float v = x[s];
        if (noisy && v != NEG_INF) v = (v + gumbel_table[position_hash(key, pos[s]) >> (32 - table_bits)]) * inv_tau;
        y[s] = v;
        m = fmaxf(m, v);
    }
    m = block_reduce(m, true);
    float sum = 0.0f;
    for (int s = threadIdx.x; s < width; s += blockDim.x) {
        float e = m == NEG_INF ? 0.0f : expf(y[s] - m);
        y[s] = e;
        sum += e;
    }
    sum = block_reduce(sum, false);
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int s = threadIdx.x; s < width; s += blockDim.x) y[s] *= inv;
}

// out[h] += sum over the block's slots of probs[h][s] * v[s] (out zeroed first). Block
// (chunk of slots, query head); one thread per value dimension.
extern "C" __global__ void attn_values(const float* probs, const unsigned short* values, float* out, int n_heads,
                                       int n_kv_heads, int head_dim, int capacity, int width, int slots_per_block) {
    int h = blockIdx.y, g = h / (n_heads / n_kv_heads);
    int lo = blockIdx.x * slots_per_block, hi = min(width, lo + slots_per_block);
    const float* p = probs + (size_t)h * width;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int s = lo; s < hi; s++) {
            float w = p[s];
            if (w != 0.0f) acc += w * h2f(values[((size_t)g * capacity + s) * head_dim + d]);
        }
        atomicAdd(out + (size_t)h * head_dim + d, acc);
    }
}

// scores[g][s] += sum over the query heads of KV head g of probs[h][s] (H2O's and Keyformer's
// running sums); one thread per (KV head, slot).
extern "C" __global__ void add_scores(const float* probs, float* scores, int n_heads, int n_kv_heads, int capacity,
                                      int width) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)n_kv_heads * width) return;
    int g = i / width, s = i % width, group = n_heads / n_kv_heads;
    float acc = 0.0f;
    for (int j = 0; j < group; j++) acc += probs[(size_t)(g * group + j) * width + s];
    scores[(size_t)g * capacity + s] += acc;
}

// Sum of a buffer (the copy-bandwidth probe reads through this): grid-stride, one atomic per block.
extern "C" __global__ void read_sum(const float4* x, long n4, float* total) {
    float s = 0.0f;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += (long)gridDim.x * blockDim.x) {
        float4 v = x[i];
        s += v.x + v.y + v.z + v.w;
    }
    s = block_reduce(s, false);
    if (threadIdx.x == 0) atomicAdd(total, s);
}
