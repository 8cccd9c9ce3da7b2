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

// Four values as f16 at p (8-byte aligned).
__device__ __forceinline__ void store_f16x4(unsigned short* p, float4 v) {
    *(uint2*)p = make_uint2((unsigned)f2h(v.x) | ((unsigned)f2h(v.y) << 16), (unsigned)f2h(v.z) | ((unsigned)f2h(v.w) << 16));
}

// Four signed byte products added to c (quant_blocks.cuh's integer sums).
__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
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

// The float4s of a row each thread of a norm's block keeps in registers between the sum of
// squares and the scaling: rows of up to 8 * 4 * blockDim values (8192 at 256 threads) are
// read once, their loads all in flight together (a loop of dependent strided loads made a
// 4096-wide norm cost about as much as a 4096 x 4096 GEMV).
#define NORM_VEC 8

// One block's row: x (+= y first when ADD; x then holds the sum) normed into out =
// x / sqrt(mean(x^2) + eps) * weight.
template <bool ADD>
__device__ __forceinline__ void rms_norm_row(float* x, const float* y, const float* weight, float* out,
                                             unsigned short* out16, int dim, float eps) {
    int n4 = dim >> 2;
    if ((dim & 3) == 0 && n4 <= NORM_VEC * (int)blockDim.x) {
        float4 v[NORM_VEC], w[NORM_VEC];
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < NORM_VEC; k++) {
            int i = threadIdx.x + k * blockDim.x;
            if (i < n4) {
                v[k] = ((const float4*)x)[i];
                w[k] = ((const float4*)weight)[i];
                if (ADD) {
                    float4 a = ((const float4*)y)[i];
                    v[k].x += a.x;
                    v[k].y += a.y;
                    v[k].z += a.z;
                    v[k].w += a.w;
                    ((float4*)x)[i] = v[k];
                }
                s += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
            }
        }
        float inv = rsqrtf(block_reduce(s, false) / dim + eps);
#pragma unroll
        for (int k = 0; k < NORM_VEC; k++) {
            int i = threadIdx.x + k * blockDim.x;
            if (i < n4) {
                float4 o = make_float4(v[k].x * inv * w[k].x, v[k].y * inv * w[k].y, v[k].z * inv * w[k].z,
                                       v[k].w * inv * w[k].w);
                ((float4*)out)[i] = o;
                if (out16) store_f16x4(out16 + 4 * i, o);
            }
        }
        return;
    }
    float s = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        if (ADD) x[i] += y[i];
        s += x[i] * x[i];
    }
    float inv = rsqrtf(block_reduce(s, false) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        out[i] = x[i] * inv * weight[i];
        if (out16) out16[i] = f2h(out[i]);
    }
}

// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight; one block per row.
// out16, when not null, receives an f16 copy of out (the input of a product through cuBLAS).
extern "C" __global__ void rms_norm(const float* x, const float* weight, float* out, unsigned short* out16, int dim,
                                    float eps) {
    size_t at = (size_t)blockIdx.x * dim;
    rms_norm_row<false>((float*)x + at, nullptr, weight, out + at, out16 ? out16 + at : nullptr, dim, eps);
}

// The residual add and the norm after it in one pass: x[r] += y[r], then out[r] = the RMS
// norm of x[r]; one block per row.
extern "C" __global__ void add_rms_norm(float* x, const float* y, const float* weight, float* out,
                                        unsigned short* out16, int dim, float eps) {
    size_t at = (size_t)blockIdx.x * dim;
    rms_norm_row<true>(x + at, y + at, weight, out + at, out16 ? out16 + at : nullptr, dim, eps);
}

// RoPE on the first 2 * rope_pairs values of every head, by the row's position: pair i is
// (2i, 2i+1) (Llama files) or, with halves != 0, (i, i + rope_pairs) (NeoX); cos and sin are
// multiplied by mscale (YaRN). One thread per pair. x: [rows][n_heads * head_dim].
// A second tensor x2 of n_heads2 heads per row (the keys beside the queries) is turned in the
// same launch, by the threads past the first's pairs; n_heads2 = 0 when there is none.
// x16, when not null, receives an f16 copy of x's turned values (the host passes it only when
// every value of a head is turned).
extern "C" __global__ void rope(float* x, const unsigned* positions, const float* inv_freq, int rows, int n_heads,
                                int head_dim, int rope_pairs, int halves, float mscale, float* x2, int n_heads2,
                                unsigned short* x16) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long per_row = (long)n_heads * rope_pairs;
    if (i >= rows * per_row) {
        i -= rows * per_row;
        per_row = (long)n_heads2 * rope_pairs;
        if (i >= rows * per_row) return;
        x = x2;
        n_heads = n_heads2;
        x16 = nullptr;
    }
    int r = i / per_row, rest = i % per_row, h = rest / rope_pairs, p = rest % rope_pairs;
    float s, c;
    sincosf((float)positions[r] * inv_freq[p], &s, &c);
    s *= mscale;
    c *= mscale;
    float* head = x + (size_t)r * n_heads * head_dim + h * head_dim;
    int ia = halves ? p : 2 * p, ib = halves ? p + rope_pairs : 2 * p + 1;
    float a = head[ia], b = head[ib];
    float ra = a * c - b * s, rb = a * s + b * c;
    head[ia] = ra;
    head[ib] = rb;
    if (x16) {
        unsigned short* head16 = x16 + (size_t)r * n_heads * head_dim + h * head_dim;
        head16[ia] = f2h(ra);
        head16[ib] = f2h(rb);
    }
}

// out[r] = (x[r] - mean) / sqrt(var + eps) * weight (+ bias when has_bias); one block per row.
extern "C" __global__ void layer_norm(const float* x, const float* weight, const float* bias, int has_bias,
                                      float* out, int dim, float eps) {
    const float* row = x + (size_t)blockIdx.x * dim;
    float s = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += row[i];
    float mean = block_reduce(s, false) / dim;
    float v = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) v += (row[i] - mean) * (row[i] - mean);
    float inv = rsqrtf(block_reduce(v, false) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        out[(size_t)blockIdx.x * dim + i] = (row[i] - mean) * inv * weight[i] + (has_bias ? bias[i] : 0.0f);
}

// RMSNorm in place of each dim-sized piece of x (Q/K norms: one block per head of a row).
extern "C" __global__ void rms_norm_in_place(float* x, const float* weight, int dim, float eps) {
    float* row = x + (size_t)blockIdx.x * dim;
    float s = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += row[i] * row[i];
    float inv = rsqrtf(block_reduce(s, false) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) row[i] = row[i] * inv * weight[i];
}

// x[i] += bias[i % dim] over n values.
extern "C" __global__ void add_bias(float* x, const float* bias, long n, int dim) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += bias[i % dim];
}

// x *= s.
extern "C" __global__ void scale_assign(float* x, float s, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

__device__ __forceinline__ float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978846f * (x + 0.044715f * x * x * x)));
}

// gate = gelu_tanh(gate) * up (GeGLU); with up == 0, gate = gelu_tanh(gate).
extern "C" __global__ void gelu_mul(float* gate, const float* up, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) gate[i] = gelu_tanh(gate[i]) * (up ? up[i] : 1.0f);
}

// x = gelu(x), exact: x * Phi(x) (GPT-NeoX, MPT).
extern "C" __global__ void gelu_erf(float* x, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678f));
}

// x into [-limit, limit] (MPT's clip_qkv).
extern "C" __global__ void clamp_values(float* x, long n, float limit) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = fminf(fmaxf(x[i], -limit), limit);
}

__device__ __forceinline__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// gate = silu(gate) * up; gate16, when not null, receives an f16 copy of the result. Four
// values a thread where n allows (the prompt's 4096 x 11008 is bandwidth-bound).
extern "C" __global__ void silu_mul(float* gate, const float* up, long n, unsigned short* gate16) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if ((n & 3) == 0) {
        if (4 * i >= n) return;
        float4 g = ((const float4*)gate)[i], u = ((const float4*)up)[i];
        float4 o = make_float4(silu_times(g.x, u.x), silu_times(g.y, u.y), silu_times(g.z, u.z), silu_times(g.w, u.w));
        ((float4*)gate)[i] = o;
        if (gate16) store_f16x4(gate16 + 4 * i, o);
        return;
    }
    if (i < n) {
        gate[i] = silu_times(gate[i], up[i]);
        if (gate16) gate16[i] = f2h(gate[i]);
    }
}

// y[r] = sum_c W[r][c] x[c], one activation row (a decode step of one sequence): a warp per
// pair of output rows (each activation load serves both), each lane with 4 x 16 bytes of each
// row in flight before it computes, the f32 activations read as they are (no rounding to f16,
// no conversion kernel), f32 sums. cols % 8 == 0 (every row then starts 16-byte aligned).
// On an H100 it reads an 11008 x 4096 weight at 88% of the bandwidth where the f16 conversion
// plus cuBLAS reached 77%; with 4 activation rows it was slower than cuBLAS (their loads
// dominate).
#define GEMV_UNROLL 4

// A 16-byte load that skips L1: each weight is read once (the activations stay in L1).
__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
    uint4 q;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(q.x), "=r"(q.y), "=r"(q.z), "=r"(q.w)
        : "l"(p));
    return q;
}

__device__ __forceinline__ float dot8(uint4 q, float4 a, float4 b) {
    return h2f(q.x & 0xffff) * a.x + h2f(q.x >> 16) * a.y + h2f(q.y & 0xffff) * a.z + h2f(q.y >> 16) * a.w +
           h2f(q.z & 0xffff) * b.x + h2f(q.z >> 16) * b.y + h2f(q.w & 0xffff) * b.z + h2f(q.w >> 16) * b.w;
}

// Up to GEMV_WEIGHTS weights that share their input (Q, K and V; gate and up) go in one
// launch, blockIdx.y picking the weight: one wave of blocks instead of three short ones.
#define GEMV_WEIGHTS 3
struct GemvWeights {
    const void* w[GEMV_WEIGHTS];
    float* y[GEMV_WEIGHTS];
    int rows[GEMV_WEIGHTS];
};

// Entry j of a parameter array, selected rather than indexed (indexing copies the array to
// the stack).
template <typename T>
__device__ __forceinline__ T pick(const T (&a)[GEMV_WEIGHTS], unsigned j) {
    return j == 0 ? a[0] : (j == 1 ? a[1] : a[2]);
}

extern "C" __global__ void gemv_f16(GemvWeights ws, const float* x, int cols) {
    const unsigned short* w = (const unsigned short*)pick(ws.w, blockIdx.y);
    float* y = pick(ws.y, blockIdx.y);
    int rows = pick(ws.rows, blockIdx.y);
    int pair = (int)((blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    int r0 = 2 * pair;
    if (r0 >= rows) return;
    int r1 = r0 + 1 < rows ? r0 + 1 : r0;  // an odd last row is computed twice, written once
    int c8 = cols >> 3;
    const uint4* w0 = (const uint4*)(w + (long)r0 * cols);
    const uint4* w1 = (const uint4*)(w + (long)r1 * cols);
    const float4* x4 = (const float4*)x;
    float acc0 = 0.0f, acc1 = 0.0f;
    for (int base = lane; base < c8; base += 32 * GEMV_UNROLL) {
        uint4 q0[GEMV_UNROLL], q1[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            int i = base + 32 * u;
            if (i < c8) {
                q0[u] = load_streaming(w0 + i);
                q1[u] = load_streaming(w1 + i);
            }
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            int i = base + 32 * u;
            if (i < c8) {
                float4 a = x4[2 * i], b = x4[2 * i + 1];
                acc0 += dot8(q0[u], a, b);
                acc1 += dot8(q1[u], a, b);
            }
        }
    }
    acc0 = warp_sum(acc0);
    acc1 = warp_sum(acc1);
    if (lane == 0) {
        y[r0] = acc0;
        if (r1 != r0) y[r1] = acc1;
    }
}

// Columns first..first + width of every row of a rows x cols f16 matrix into a rows x width
// one (a tensor-parallel shard's part of a matrix split by its input features).
extern "C" __global__ void copy_columns_f16(const unsigned short* src, long rows, long cols, long first, long width,
                                            unsigned short* dst) {
    long n = rows * width;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / width;
        dst[i] = src[r * cols + first + (i - r * width)];
    }
}

extern "C" __global__ void f32_to_f16(const float* x, unsigned short* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f2h(x[i]);
}

// keyformer_kv::noise::counter_hash(seed, layer, head, step, 0xffffffff): the 64-bit key of a
// noise row (splitmix64's finaliser, chained), of which the low 32 bits key the positions.
__device__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The scoring kernels' `layer` argument carries a tensor-parallel shard's first query head in
// its top 16 bits (`noise_layer_arg` on the host): a shard draws its heads' noise by their
// GLOBAL indices, as the whole model on one device does.
__device__ unsigned noise_row_key(unsigned long long seed, unsigned layer_arg, unsigned head, unsigned step) {
    unsigned layer = layer_arg & 0xffffu;
    head += layer_arg >> 16;
    unsigned long long a = mix64(seed ^ 0x9E3779B97F4A7C15ull);
    unsigned long long b = mix64(a ^ (((unsigned long long)layer << 32) | head));
    return (unsigned)mix64(b ^ (((unsigned long long)step << 32) | 0xffffffffull));
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

#define ATTN_CHUNK 128
#define ATTN_WARPS 8
#define UNROLL 4
#define ATTN_MAX_GROUP 8
#define ATTN_MAX_HEAD_DIM 128  // the common entry points; Gemma's 256 has its own (HD below)
#define ATTN_CHUNKS 256
#define SCORE_NONE 0
#define SCORE_ATTENTION 1
#define SCORE_KEYFORMER 2
#define SCORE_RECONSTRUCTION 3  // KVzip's, prefill only

// Two f16 values (4 bytes) as floats.
__device__ __forceinline__ float2 h2f2(const unsigned short* p) {
    unsigned u = *(const unsigned*)p;
    return make_float2(h2f((unsigned short)(u & 0xffffu)), h2f((unsigned short)(u >> 16)));
}

// A lane's share of an f16 row of head_dim values: pairs (2 lane + 64 r, + 1), zeros past the end.
template <int HD>
__device__ __forceinline__ void lane_pairs(const unsigned short* row, int lane, int head_dim, float2 (&out)[HD / 64]) {
#pragma unroll
    for (int r = 0; r < HD / 64; r++) {
        int i = 2 * lane + 64 * r;
        out[r] = i < head_dim ? h2f2(row + i) : make_float2(0.0f, 0.0f);
    }
}

// One row of a batched attention: a query token of some sequence with that sequence's KV head
// storage for this layer. A batch of decode steps has one row per sequence; a prompt chunk
// one row per token, all over the same storage. Rust's `AttnRow` mirrors this (repr(C)).
struct AttnRow {
    const float* q;           // [n_heads][head_dim]
    const float* k;           // the row's new key and value [n_kv_heads][head_dim]
    const float* v;
    float* out;               // [n_heads][head_dim]
    unsigned short* keys;     // [n_kv_heads][capacity][head_dim]
    unsigned short* values;
    unsigned* slot_pos;       // [n_kv_heads][capacity]
    float* scores;            // [n_kv_heads][score_stride]
    unsigned* victims;        // [n_kv_heads]: the slot each KV head's next token takes
    int capacity;
    int width;                // slots 0..width are examined
    unsigned query_pos;
    int store_slot;           // the new token's slot; -1: victims[g]
    int score_mode;
    float inv_tau;
    unsigned long long seed;
    int score_stride;
    int pad0;
    unsigned first_recent;    // eviction keeps positions >= first_recent
    unsigned sinks;           // and positions < sinks
    int evict;                // choose (and free) a victim slot after attention
    int pad;
    const int* heads;         // null, or per KV head (first slot, slots): heads packed one after
                              // another, each with its own budget (scores laid out the same way)
};

// Where KV head g's slots of a row lie in the layer's storage: its first slot, the slots
// attention examines, the slots it has, and its first score. Without `heads` every head has
// `capacity` slots (head g from g * capacity) of which the first `width` are examined.
struct HeadSlots {
    size_t first;
    int width;
    int capacity;
    size_t first_score;
};
__device__ __forceinline__ HeadSlots head_slots(const AttnRow& r, int g) {
    if (r.heads) {
        size_t first = (size_t)r.heads[2 * g];
        int n = r.heads[2 * g + 1];
        return {first, n, n, first};
    }
    return {(size_t)g * r.capacity, r.width, r.capacity, (size_t)g * r.score_stride};
}

// Store each row's new key and value (block (row, KV head g)) at its slot, with its position
// and a zero score.
extern "C" __global__ void kv_store(const AttnRow* rows, int head_dim) {
    const AttnRow& r = rows[blockIdx.x];
    int g = blockIdx.y;
    HeadSlots hs = head_slots(r, g);
    int slot = r.store_slot >= 0 ? r.store_slot : (int)r.victims[g];
    if (slot < 0 || slot >= hs.capacity) return;  // no victim was free (the host never asks for that)
    size_t at = (hs.first + slot) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        r.keys[at + d] = f2h(r.k[(size_t)g * head_dim + d]);
        r.values[at + d] = f2h(r.v[(size_t)g * head_dim + d]);
    }
    if (threadIdx.x == 0) {
        r.slot_pos[hs.first + slot] = r.query_pos;
        if (r.scores) r.scores[hs.first_score + slot] = 0.0f;
    }
}

// Decode attention, pass 1 (flash-decoding): block (row z, KV head g, chunk c of ATTN_CHUNK
// slots), ATTN_WARPS warps, reads each key and value of its chunk once for the whole group of
// query heads and writes, per query head, the chunk's unnormalised output, its softmax max and
// sum, and (when a policy scores) the scored softmax's exponentials with their max and sum: the
// plain ones (H2O) or those of (logit + g) / tau with g drawn as the CPU draws it (Keyformer).
// part_out [rows][n_heads][chunks][head_dim]; part_stats [rows][n_heads][chunks][4] =
// (m, l, m', l'); score_exps [rows][n_heads][max_width]. head_dim a multiple of 16, at most
// ATTN_MAX_HEAD_DIM.
// ALiBi's slope of query head h (MPT's: n heads rounded up to a power of two p, slopes
// 2^(-max_bias i / p), the odd-numbered first when n < p); 0 when alibi_max is 0 (no ALiBi).
// The same as AttentionSpec::alibi_slope on the CPU.
__device__ __forceinline__ float alibi_slope(int h, int n_heads, float alibi_max) {
    if (alibi_max == 0.0f) return 0.0f;
    int p = 1;
    while (p < n_heads) p <<= 1;
    int i = p == n_heads ? h + 1 : (h < p / 2 ? 2 * h + 2 : 2 * (h - p / 2) + 1);
    return exp2f(-alibi_max * (float)i / (float)p);
}

// The logits of slots lo .. lo + m of KV head hs of a row for the group's query heads (sq:
// [group][head_dim] in shared memory; skey: each query head's noise key) into sl[j * ATTN_CHUNK
// + t], and for Keyformer the noisy ones ((logit + g) / tau) into sn; masked slots get NEG_INF.
// Two threads per slot (blockDim = 2 * ATTN_CHUNK), each dotting half the key (16-byte loads)
// with every query head of the group; one shuffle joins the halves. (A warp per slot needed a
// 5-step shuffle per query head and slot, and drew the noise on one lane.)
template <int GROUP>
__device__ __forceinline__ void chunk_logits(const AttnRow& row_desc, const HeadSlots& hs, int lo, int m, int group,
                                             int head_dim, int h0, int n_heads, const float* sq,
                                             const unsigned* skey, float scale, float softcap, unsigned window,
                                             float alibi_max, const float* gumbel_table, int table_bits, float* sl,
                                             float* sn) {
    int score_mode = row_desc.score_mode;
    unsigned query_pos = row_desc.query_pos;
    const unsigned short* keys = row_desc.keys;
    const unsigned* slot_pos = row_desc.slot_pos;
    float inv_tau = row_desc.inv_tau;
    int t = threadIdx.x >> 1, half = threadIdx.x & 1;
    int tt = min(t, m - 1);
    unsigned p = slot_pos[hs.first + lo + tt];
    int span = head_dim / 2, d0 = half * span;
    const uint4* k = (const uint4*)(keys + (hs.first + lo + tt) * head_dim + d0);
    float acc[GROUP];
#pragma unroll
    for (int j = 0; j < GROUP; j++) acc[j] = 0.0f;
    for (int i = 0; i < span / 8; i++) {
        uint4 w = k[i];
        unsigned words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float a = h2f((unsigned short)(words[e] & 0xffffu)), b = h2f((unsigned short)(words[e] >> 16));
            int d = d0 + 8 * i + 2 * e;
#pragma unroll
            for (int j = 0; j < GROUP; j++)
                if (j < group) acc[j] += sq[j * head_dim + d] * a + sq[j * head_dim + d + 1] * b;
        }
    }
    bool visible = t < m && p != FREE_SLOT && p <= query_pos && (window == 0 || query_pos - p < window);
#pragma unroll
    for (int j = 0; j < GROUP; j++) {
        if (j >= group) break;
        float dsum = acc[j] + __shfl_xor_sync(0xffffffffu, acc[j], 1);
        if (half == 0 && t < m) {
            float x = dsum * scale;
            if (softcap > 0.0f) x = softcap * tanhf(x / softcap);
            x += alibi_slope(h0 + j, n_heads, alibi_max) * ((float)p - (float)query_pos);
            x = visible ? x : NEG_INF;
            sl[j * ATTN_CHUNK + t] = x;
            if (score_mode == SCORE_KEYFORMER)
                sn[j * ATTN_CHUNK + t] =
                    visible ? (x + gumbel_table[position_hash(skey[j], p) >> (32 - table_bits)]) * inv_tau : NEG_INF;
        }
    }
}

// acc[j] += sum_t w[j * ATTN_CHUNK + t] v_t over the m slots from `values` (a KV head's f16
// rows): a warp per slot (two values per lane per step, each value read once for the group),
// UNROLL slots in flight; each warp sums its own slots, the caller adds the warps' sums.
template <int GROUP, int HD>
__device__ __forceinline__ void chunk_values(const unsigned short* values, int m, int group, int head_dim,
                                             const float* w, float (&acc)[GROUP][HD / 64][2]) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int t0 = warp * UNROLL; t0 < m; t0 += ATTN_WARPS * UNROLL) {
        float2 vv[UNROLL][HD / 64];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            lane_pairs<HD>(values + (size_t)min(t0 + u, m - 1) * head_dim, lane, head_dim, vv[u]);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            if (t0 + u >= m) break;
#pragma unroll
            for (int j = 0; j < GROUP; j++) {
                if (j >= group) break;
                float wt = w[j * ATTN_CHUNK + t0 + u];
#pragma unroll
                for (int r = 0; r < HD / 64; r++) {
                    acc[j][r][0] += wt * vv[u][r].x;
                    acc[j][r][1] += wt * vv[u][r].y;
                }
            }
        }
    }
}

// out[j * stride + d] = (the block's warps' acc[j] summed) * (inv ? inv[j] : 1) for the
// group's query heads (every thread of the block calls this; sred: ATTN_WARPS * HD floats).
template <int GROUP, int HD>
__device__ __forceinline__ void warps_output(const float (&acc)[GROUP][HD / 64][2], int group, int head_dim,
                                             float* sred, float* out, size_t stride, const float* inv) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int j = 0; j < GROUP; j++) {
        if (j >= group) break;
#pragma unroll
        for (int r = 0; r < HD / 64; r++) {
            int i = 2 * lane + 64 * r;
            if (i < head_dim) {
                sred[warp * HD + i] = acc[j][r][0];
                sred[warp * HD + i + 1] = acc[j][r][1];
            }
        }
        __syncthreads();
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float o = 0.0f;
            for (int w = 0; w < ATTN_WARPS; w++) o += sred[w * HD + d];
            out[j * stride + d] = inv ? o * inv[j] : o;
        }
        __syncthreads();
    }
}

template <int GROUP, int HD>
__device__ __forceinline__ void attn_decode_partial_body(const AttnRow* rows, int n_heads, int n_kv_heads,
                                                         int head_dim, int max_width, float scale, float softcap,
                                                         unsigned window, float alibi_max, unsigned layer,
                                                         const float* gumbel_table, int table_bits,
                                                         float* part_out, float* part_stats, float* score_exps) {
    __shared__ float sq[GROUP * HD];
    __shared__ float sl[GROUP * ATTN_CHUNK];
    __shared__ float sn[GROUP * ATTN_CHUNK];
    __shared__ float sred[ATTN_WARPS * HD];
    __shared__ unsigned skey[GROUP];
    const AttnRow& row_desc = rows[blockIdx.x];
    int score_mode = row_desc.score_mode;
    unsigned query_pos = row_desc.query_pos;
    const unsigned short* values = row_desc.values;
    // Rows vary fastest: the rows of a prompt chunk read the same slots one after another,
    // so those come from L2.
    int g = blockIdx.y, c = blockIdx.z, chunks = gridDim.z, z = blockIdx.x;
    HeadSlots hs = head_slots(row_desc, g);
    int width = hs.width;
    int lo = c * ATTN_CHUNK;
    if (lo >= width) return;  // past this row's slots (rows of a batch differ in width)
    int group = n_heads / n_kv_heads, h0 = g * group;
    int m = min(width, lo + ATTN_CHUNK) - lo;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    size_t zh = (size_t)z * n_heads;  // this row's first head in the scratch
    const float* q = row_desc.q;
    for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x) sq[i] = q[(size_t)h0 * head_dim + i];
    if (score_mode == SCORE_KEYFORMER && threadIdx.x < group)
        skey[threadIdx.x] = noise_row_key(row_desc.seed, layer, h0 + threadIdx.x, query_pos);
    __syncthreads();

    chunk_logits<GROUP>(row_desc, hs, lo, m, group, head_dim, h0, n_heads, sq, skey, scale, softcap, window, alibi_max,
                        gumbel_table, table_bits, sl, sn);
    __syncthreads();

    // Each softmax over the chunk: a warp per (query head, softmax), no block-wide syncs.
    int n_soft = score_mode == SCORE_KEYFORMER ? 2 : 1;
    for (int task = warp; task < group * n_soft; task += ATTN_WARPS) {
        int j = task % group, which = task / group;
        float* row = (which == 0 ? sl : sn) + j * ATTN_CHUNK;
        float mx = NEG_INF;
        for (int t = lane; t < m; t += 32) mx = fmaxf(mx, row[t]);
        mx = warp_max(mx);
        float sum = 0.0f;
        for (int t = lane; t < m; t += 32) {
            float e = mx == NEG_INF ? 0.0f : expf(row[t] - mx);
            row[t] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            float* stats = part_stats + ((zh + h0 + j) * chunks + c) * 4;
            stats[2 * which] = mx;
            stats[2 * which + 1] = sum;
            if (score_mode != SCORE_KEYFORMER) {  // the scored softmax is the plain one (or none)
                stats[2] = mx;
                stats[3] = sum;
            }
        }
    }
    __syncthreads();

    // The chunk's unnormalised outputs, then the warps' sums added through shared memory.
    float acc[GROUP][HD / 64][2];
#pragma unroll
    for (int j = 0; j < GROUP; j++)
#pragma unroll
        for (int r = 0; r < HD / 64; r++) acc[j][r][0] = acc[j][r][1] = 0.0f;
    chunk_values<GROUP, HD>(values + (hs.first + lo) * head_dim, m, group, head_dim, sl, acc);
    warps_output<GROUP, HD>(acc, group, head_dim, sred, part_out + ((zh + h0) * chunks + c) * head_dim,
                            (size_t)chunks * head_dim, nullptr);
    if (score_mode != SCORE_NONE) {
        const float* src = score_mode == SCORE_KEYFORMER ? sn : sl;
        for (int j = 0; j < group; j++)
            for (int t = threadIdx.x; t < m; t += blockDim.x)
                score_exps[(zh + h0 + j) * max_width + lo + t] = src[j * ATTN_CHUNK + t];
    }
}

// One entry point per bound on the query heads per KV head (1, 2, 4, 8): the accumulators
// are sized by it, so a model without grouped queries (Llama 2) does not pay registers, and
// blocks per SM, for eight.
#define ATTN_PARTIAL_ENTRY(G, HD, NAME, BOUNDS)                                                        \
    extern "C" __global__ void BOUNDS NAME(                                                            \
        const AttnRow* rows, int n_heads, int n_kv_heads, int head_dim, int max_width, float scale,    \
        float softcap, unsigned window, float alibi_max,                                                \
        unsigned layer, const float* gumbel_table, int table_bits, float* part_out, float* part_stats, \
        float* score_exps) {                                                                           \
        attn_decode_partial_body<G, HD>(rows, n_heads, n_kv_heads, head_dim, max_width, scale, softcap, \
                                    window, alibi_max, layer,                                           \
                                    gumbel_table, table_bits, part_out, part_stats, score_exps);       \
    }
// One query head per KV head fits 32 registers without spills: 8 blocks of 256 threads per SM
// (64 registers, 4 blocks, for eight).
ATTN_PARTIAL_ENTRY(1, 128, attn_decode_partial_g1, __launch_bounds__(256, 8))
ATTN_PARTIAL_ENTRY(2, 128, attn_decode_partial_g2, __launch_bounds__(256))
ATTN_PARTIAL_ENTRY(4, 128, attn_decode_partial_g4, __launch_bounds__(256))
ATTN_PARTIAL_ENTRY(8, 128, attn_decode_partial_g8, __launch_bounds__(256))
// Heads of up to 256 values (Gemma 2 and 3): twice the accumulators and shared rows.
ATTN_PARTIAL_ENTRY(1, 256, attn_decode_partial_g1_hd256, __launch_bounds__(256))
ATTN_PARTIAL_ENTRY(2, 256, attn_decode_partial_g2_hd256, __launch_bounds__(256))
ATTN_PARTIAL_ENTRY(4, 256, attn_decode_partial_g4_hd256, __launch_bounds__(256))
ATTN_PARTIAL_ENTRY(8, 256, attn_decode_partial_g8_hd256, __launch_bounds__(256))

// The bits of x as an unsigned integer ordered as Rust's f32::total_cmp orders floats.
__device__ __forceinline__ unsigned total_order_bits(float x) {
    unsigned b = __float_as_uint(x);
    return (b >> 31) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ unsigned long long warp_min_u64(unsigned long long v) {
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w < v ? w : v;
    }
    return v;
}

// A slot's key as a victim candidate: its score's bits in total order above its position
// (keyformer_kv's single-victim choice: the lowest score, ties to the oldest), ~0 for a slot
// that may not go: free, in the recent window (position >= first_recent) or a sink (position
// < sinks).
__device__ __forceinline__ unsigned long long victim_key(const AttnRow& r, unsigned p, float score) {
    bool may_go = p != FREE_SLOT && p < r.first_recent && p >= r.sinks;
    return may_go ? ((unsigned long long)total_order_bits(score) << 32) | p : ~0ull;
}

// The least of the block's candidates (each thread's `best`, at `best_slot`; every thread of
// the block calls this): returns its key (~0 where there is none) and, in *slot, its slot.
__device__ unsigned long long block_least_victim(unsigned long long best, int best_slot, unsigned* slot) {
    __shared__ unsigned long long partial[32];
    __shared__ unsigned long long block_best;
    __shared__ unsigned block_slot;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned long long v = warp_min_u64(best);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? partial[lane] : ~0ull;
        v = warp_min_u64(v);
        if (lane == 0) {
            block_best = v;
            block_slot = FREE_SLOT;
        }
    }
    __syncthreads();
    // Positions are distinct within a head: one thread holds the best.
    if (block_best != ~0ull && best == block_best) block_slot = (unsigned)best_slot;
    __syncthreads();
    *slot = block_slot;
    return block_best;
}

// Free `slot` of KV head g of a row (FREE_SLOT: none was found) and make it the slot of the
// row's next token.
__device__ void free_victim(const AttnRow& r, const HeadSlots& hs, int g, unsigned slot) {
    r.victims[g] = slot;
    if (slot != FREE_SLOT) {
        r.slot_pos[hs.first + slot] = FREE_SLOT;
        if (r.scores) r.scores[hs.first_score + slot] = 0.0f;
    }
}

// The victim choice as a kernel of its own, block (g, row z) for rows that evict (the
// combination pass chooses them when its blocks split a head's slots into ranges and the batch
// is large: `CombinePlan` in mod.rs).
extern "C" __global__ void choose_victims(const AttnRow* rows) {
    const AttnRow& r = rows[blockIdx.y];
    if (!r.evict) return;
    int g = blockIdx.x;
    HeadSlots hs = head_slots(r, g);
    const float* sc = r.scores ? r.scores + hs.first_score : nullptr;
    const unsigned* pos = r.slot_pos + hs.first;
    unsigned long long best = ~0ull;
    int best_slot = -1;
    for (int s = threadIdx.x; s < hs.width; s += blockDim.x) {
        unsigned long long key = victim_key(r, pos[s], sc ? sc[s] : 0.0f);
        if (key < best) {
            best = key;
            best_slot = s;
        }
    }
    unsigned slot;
    block_least_victim(best, best_slot, &slot);
    if (threadIdx.x == 0) free_victim(r, hs, g, slot);
}

// Decode attention, pass 2: block (KV head g, range y of `range_slots` slots, row z) combines
// the chunks of g's query heads (out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c; blocks
// with y = 0 write it) and, when a policy scores, adds each slot of its range's probability
// summed over the group to the row's scores[g][slot]. A warp per (query head, softmax) finds
// the chunk weights, its lanes over the chunks; every block of a KV head recomputes them so
// that the slots can spread over many blocks; no atomics, so the sums are the same every run.
// Small batches split a head's slots into ranges (more blocks); large ones give a block the
// whole head (range_slots >= width), which then also chooses the victim from the scores it
// has in registers.
// With `fold_victims`, a row that evicts has each KV head's victim chosen here: with one range
// the block frees it; with several each block writes its range's best to victim_keys /
// victim_slots [rows][n_kv_heads][ranges] and the last of them to finish (counted in
// victim_count, which it resets) takes the best of all, frees that slot and makes it the
// row's next token's slot.
extern "C" __global__ void attn_decode_combine(const AttnRow* rows, const float* part_out,
                                               const float* part_stats, const float* score_exps, int n_heads,
                                               int n_kv_heads, int head_dim, int max_width, int max_chunks,
                                               int range_slots, int fold_victims, unsigned long long* victim_keys,
                                               unsigned* victim_slots, unsigned* victim_count) {
    __shared__ float weight[ATTN_MAX_GROUP * ATTN_CHUNKS];   // e^(m_c - M) / L, output
    __shared__ float sweight[ATTN_MAX_GROUP * ATTN_CHUNKS];  // the same for the scored softmax
    const AttnRow& r = rows[blockIdx.z];
    int g = blockIdx.x, group = n_heads / n_kv_heads, h0 = g * group;
    HeadSlots hs = head_slots(r, g);
    int width = hs.width, score_mode = r.score_mode;
    int chunks = (width + ATTN_CHUNK - 1) / ATTN_CHUNK;
    int lo = blockIdx.y * range_slots, hi = min(width, lo + range_slots);
    bool writes_out = blockIdx.y == 0, victim = r.evict && fold_victims;
    if (!writes_out && ((score_mode == SCORE_NONE && !victim) || lo >= width)) return;
    size_t zh = (size_t)blockIdx.z * n_heads;
    if (width == 0) {
        if (writes_out) {
            for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x) r.out[(size_t)h0 * head_dim + i] = 0.0f;
            if (victim && threadIdx.x == 0) r.victims[g] = FREE_SLOT;
        }
        return;
    }
    int n_soft = score_mode == SCORE_NONE ? 1 : 2;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int task = warp; task < group * n_soft; task += blockDim.x >> 5) {
        int j = task % group, which = task / group;
        if (which == 0 && !writes_out) continue;
        const float* st = part_stats + (zh + h0 + j) * max_chunks * 4 + 2 * which;
        float* w = (which == 0 ? weight : sweight) + j * ATTN_CHUNKS;
        float M = NEG_INF;
        for (int cc = lane; cc < chunks; cc += 32) M = fmaxf(M, st[cc * 4]);
        M = warp_max(M);
        float L = 0.0f;
        for (int cc = lane; cc < chunks; cc += 32) {
            float e = M == NEG_INF ? 0.0f : expf(st[cc * 4] - M);
            w[cc] = e;
            L += e * st[cc * 4 + 1];
        }
        L = warp_sum(L);
        float inv = L > 0.0f ? 1.0f / L : 0.0f;
        for (int cc = lane; cc < chunks; cc += 32) w[cc] *= inv;  // the entries this lane wrote
    }
    __syncthreads();
    if (writes_out) {
        for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x) {
            int j = i / head_dim, d = i % head_dim;
            const float* po = part_out + (zh + h0 + j) * max_chunks * head_dim + d;
            float acc = 0.0f;
            for (int cc = 0; cc < chunks; cc++) acc += weight[j * ATTN_CHUNKS + cc] * po[(size_t)cc * head_dim];
            r.out[(size_t)(h0 + j) * head_dim + d] = acc;
        }
    }
    if (score_mode == SCORE_NONE && !victim) return;
    float* scores = r.scores ? r.scores + hs.first_score : nullptr;
    const unsigned* pos = r.slot_pos + hs.first;
    unsigned long long best = ~0ull;
    int best_slot = -1;
    for (int s = lo + threadIdx.x; s < hi; s += blockDim.x) {
        float score = scores ? scores[s] : 0.0f;
        if (score_mode != SCORE_NONE) {
            int cc = s / ATTN_CHUNK;
            float acc = 0.0f;
            for (int j = 0; j < group; j++)
                acc += score_exps[(zh + h0 + j) * max_width + s] * sweight[j * ATTN_CHUNKS + cc];
            score += acc;
            scores[s] = score;
        }
        if (victim) {
            unsigned long long key = victim_key(r, pos[s], score);
            if (key < best) {
                best = key;
                best_slot = s;
            }
        }
    }
    if (!victim) return;
    __shared__ bool last;
    unsigned block_slot;
    unsigned long long block_best = block_least_victim(best, best_slot, &block_slot);
    int ranges = (width + range_slots - 1) / range_slots;
    if (ranges == 1) {
        if (threadIdx.x == 0) free_victim(r, hs, g, block_slot);
        return;
    }
    size_t head = (size_t)blockIdx.z * n_kv_heads + g;
    if (threadIdx.x == 0) {
        victim_keys[head * gridDim.y + blockIdx.y] = block_best;
        victim_slots[head * gridDim.y + blockIdx.y] = block_slot;
        __threadfence();
        last = atomicAdd(&victim_count[head], 1u) == (unsigned)ranges - 1;
    }
    __syncthreads();
    if (!last || threadIdx.x != 0) return;
    __threadfence();
    unsigned long long all = ~0ull;
    unsigned slot = FREE_SLOT;
    for (int y = 0; y < ranges; y++) {
        unsigned long long k = ((volatile unsigned long long*)victim_keys)[head * gridDim.y + y];
        if (k < all) {
            all = k;
            slot = ((volatile unsigned*)victim_slots)[head * gridDim.y + y];
        }
    }
    victim_count[head] = 0;
    free_victim(r, hs, g, slot);
}

// Decode attention in one pass (large batches: `DecodePass::OnePass` in mod.rs): block (row z,
// KV head g) walks all of the head's slots ATTN_CHUNK at a time with an online softmax (the
// output rescaled as the maximum grows), keeping each slot's scored logit (plain for H2O, noisy
// for Keyformer) in shared memory (dynamic: [group][max_width] floats); at the end, with the
// final maxima and sums, it writes the output, adds each slot's probability summed over the
// group to the scores and, for a row that evicts, chooses the victim. No scratch in global
// memory, no second kernel: what the chunks and their combination compute, in another order of
// float operations.
template <int GROUP, int HD>
__device__ __forceinline__ void attn_decode_one_pass_body(const AttnRow* rows, int n_heads, int n_kv_heads,
                                                          int head_dim, int max_width, float scale, float softcap,
                                                          unsigned window, float alibi_max, unsigned layer,
                                                          const float* gumbel_table, int table_bits) {
    extern __shared__ float kept_logits[];  // [group][max_width], when a policy scores
    __shared__ float sq[GROUP * HD];
    __shared__ float sl[GROUP * ATTN_CHUNK];
    __shared__ float sn[GROUP * ATTN_CHUNK];
    __shared__ float sred[ATTN_WARPS * HD];
    __shared__ unsigned skey[GROUP];
    // Per (softmax, query head): the running maximum and sum; per query head, the factor that
    // takes the output summed so far to the new maximum, and 1 / the final plain sum.
    __shared__ float run_max[2 * GROUP], run_sum[2 * GROUP], rescale[GROUP], inv_sum[GROUP];
    const AttnRow& r = rows[blockIdx.x];
    int g = blockIdx.y;
    HeadSlots hs = head_slots(r, g);
    int width = hs.width, score_mode = r.score_mode;
    int group = n_heads / n_kv_heads, h0 = g * group;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int n_soft = score_mode == SCORE_KEYFORMER ? 2 : 1;
    // The softmax whose probabilities are the scores: the noisy one for Keyformer, else the plain.
    int kept = score_mode == SCORE_KEYFORMER ? 1 : 0;
    for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x) sq[i] = r.q[(size_t)h0 * head_dim + i];
    if (threadIdx.x < group) {
        if (score_mode == SCORE_KEYFORMER) skey[threadIdx.x] = noise_row_key(r.seed, layer, h0 + threadIdx.x, r.query_pos);
        run_max[threadIdx.x] = run_max[GROUP + threadIdx.x] = NEG_INF;
        run_sum[threadIdx.x] = run_sum[GROUP + threadIdx.x] = 0.0f;
    }
    __syncthreads();
    float acc[GROUP][HD / 64][2];
#pragma unroll
    for (int j = 0; j < GROUP; j++)
#pragma unroll
        for (int q = 0; q < HD / 64; q++) acc[j][q][0] = acc[j][q][1] = 0.0f;
    for (int lo = 0; lo < width; lo += ATTN_CHUNK) {
        int m = min(width - lo, ATTN_CHUNK);
        chunk_logits<GROUP>(r, hs, lo, m, group, head_dim, h0, n_heads, sq, skey, scale, softcap, window, alibi_max,
                            gumbel_table, table_bits, sl, sn);
        __syncthreads();
        // A warp per (query head, softmax): the chunk's maximum, the running maximum and sum
        // moved to it; the plain softmax's exponentials (against the new maximum) replace its
        // logits for the values.
        for (int task = warp; task < group * n_soft; task += ATTN_WARPS) {
            int j = task % group, which = task / group;
            float* row = (which == 0 ? sl : sn) + j * ATTN_CHUNK;
            float mx = NEG_INF;
            for (int t = lane; t < m; t += 32) {
                mx = fmaxf(mx, row[t]);
                if (which == kept && score_mode != SCORE_NONE) kept_logits[j * max_width + lo + t] = row[t];
            }
            mx = warp_max(mx);
            float before = run_max[which * GROUP + j], now = fmaxf(before, mx);
            float sum = 0.0f;
            for (int t = lane; t < m; t += 32) {
                float e = now == NEG_INF ? 0.0f : expf(row[t] - now);
                if (which == 0) row[t] = e;
                sum += e;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                float a = before == NEG_INF ? 0.0f : expf(before - now);
                run_sum[which * GROUP + j] = run_sum[which * GROUP + j] * a + sum;
                run_max[which * GROUP + j] = now;
                if (which == 0) rescale[j] = a;
            }
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < GROUP; j++) {
            if (j >= group) break;
            float a = rescale[j];
#pragma unroll
            for (int q = 0; q < HD / 64; q++) {
                acc[j][q][0] *= a;
                acc[j][q][1] *= a;
            }
        }
        chunk_values<GROUP, HD>(r.values + (hs.first + lo) * head_dim, m, group, head_dim, sl, acc);
        __syncthreads();  // sl and sn are the next chunk's
    }
    if (threadIdx.x < group) {
        float l = run_sum[threadIdx.x];
        inv_sum[threadIdx.x] = l > 0.0f ? 1.0f / l : 0.0f;
    }
    __syncthreads();
    warps_output<GROUP, HD>(acc, group, head_dim, sred, r.out + (size_t)h0 * head_dim, head_dim, inv_sum);
    if (score_mode == SCORE_NONE && !r.evict) return;
    float* scores = r.scores ? r.scores + hs.first_score : nullptr;
    const unsigned* pos = r.slot_pos + hs.first;
    unsigned long long best = ~0ull;
    int best_slot = -1;
    for (int s = threadIdx.x; s < width; s += blockDim.x) {
        float score = scores ? scores[s] : 0.0f;
        if (score_mode != SCORE_NONE) {
            float add = 0.0f;
            for (int j = 0; j < group; j++) {
                float mx = run_max[kept * GROUP + j], l = run_sum[kept * GROUP + j];
                if (mx != NEG_INF && l > 0.0f) add += expf(kept_logits[j * max_width + s] - mx) / l;
            }
            score += add;
            scores[s] = score;
        }
        if (r.evict) {
            unsigned long long key = victim_key(r, pos[s], score);
            if (key < best) {
                best = key;
                best_slot = s;
            }
        }
    }
    if (!r.evict) return;
    unsigned slot;
    block_least_victim(best, best_slot, &slot);
    if (threadIdx.x == 0) free_victim(r, hs, g, slot);
}

#define ATTN_ONE_PASS_ENTRY(G, NAME, BOUNDS)                                                                  \
    extern "C" __global__ void BOUNDS NAME(const AttnRow* rows, int n_heads, int n_kv_heads, int head_dim,    \
                                           int max_width, float scale, float softcap, unsigned window,        \
                                           float alibi_max, unsigned layer, const float* gumbel_table,        \
                                           int table_bits) {                                                  \
        attn_decode_one_pass_body<G, 128>(rows, n_heads, n_kv_heads, head_dim, max_width, scale, softcap,     \
                                          window, alibi_max, layer, gumbel_table, table_bits);               \
    }
ATTN_ONE_PASS_ENTRY(1, attn_decode_one_pass_g1, __launch_bounds__(256, 4))
ATTN_ONE_PASS_ENTRY(2, attn_decode_one_pass_g2, __launch_bounds__(256))
ATTN_ONE_PASS_ENTRY(4, attn_decode_one_pass_g4, __launch_bounds__(256))
ATTN_ONE_PASS_ENTRY(8, attn_decode_one_pass_g8, __launch_bounds__(256))

// Compaction after the prompt: slot to[i] of the new storage takes slot from[i] of the old
// (keys, values, position, score; slots counted over the whole layer); block i.
extern "C" __global__ void gather_slots(const unsigned* from, const unsigned* to, int head_dim,
                                        const unsigned short* keys, const unsigned short* values,
                                        const unsigned* slot_pos, const float* scores, unsigned short* new_keys,
                                        unsigned short* new_values, unsigned* new_pos, float* new_scores) {
    size_t src = from[blockIdx.x], dst = to[blockIdx.x];
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        new_keys[dst * head_dim + d] = keys[src * head_dim + d];
        new_values[dst * head_dim + d] = values[src * head_dim + d];
    }
    if (threadIdx.x == 0) {
        new_pos[dst] = slot_pos[src];
        if (scores) new_scores[dst] = scores[src];
    }
}

// Row tokens[i] of an f16 table [vocab][dim] into out[i] as f32.
extern "C" __global__ void embed_rows(const unsigned short* table, const unsigned* tokens, float* out, int dim) {
    const unsigned short* row = table + (size_t)tokens[blockIdx.x] * dim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) out[(size_t)blockIdx.x * dim + d] = h2f(row[d]);
}

// Prefill (prompt rows through cuBLAS): append n rows' keys and values at slots start.., with
// positions first_pos..; block (row, KV head g).
extern "C" __global__ void kv_append(const float* k, const float* v, unsigned short* keys, unsigned short* values,
                                     unsigned* slot_pos, int start, unsigned first_pos, int head_dim, int capacity) {
    int r = blockIdx.x, g = blockIdx.y, n_kv = gridDim.y;
    size_t from = ((size_t)r * n_kv + g) * head_dim, to = ((size_t)g * capacity + start + r) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        keys[to + d] = f2h(k[from + d]);
        values[to + d] = f2h(v[from + d]);
    }
    if (threadIdx.x == 0) slot_pos[(size_t)g * capacity + start + r] = first_pos + r;
}

// Prefill softmax: block (row r, query head h) over S[h][r][0..width) (scaled logits from
// cuBLAS): masks slots after the row's position (and free ones), writes the probabilities as
// f16 to P[h][r][..] for the value product, and, when a policy scores, overwrites S's row with
// the scored probabilities (plain, or Keyformer's softmax((x + g) / tau) with the CPU's noise,
// or KVzip's: the softmax over the sinks (positions < sinks), the part repeated
// (first..end) and the repetition (from `from_pos` on), kept for the part's slots only, the
// rest 0; rows before `from_pos` score nothing).
extern "C" __global__ void prefill_softmax(float* S, unsigned short* P, const unsigned* slot_pos, int n_heads,
                                           int n_kv_heads, int rows, int width, int capacity, unsigned first_qpos,
                                           int score_mode, float inv_tau, unsigned long long seed, unsigned layer,
                                           const float* gumbel_table, int table_bits, float softcap,
                                           unsigned window, float alibi_max, unsigned sinks, unsigned first,
                                           unsigned end, unsigned from_pos) {
    int r = blockIdx.x, h = blockIdx.y, g = h / (n_heads / n_kv_heads);
    unsigned qpos = first_qpos + r;
    float* row = S + ((size_t)h * rows + r) * width;
    unsigned short* prow = P + ((size_t)h * rows + r) * width;
    const unsigned* pos = slot_pos + (size_t)g * capacity;
    float slope = alibi_slope(h, n_heads, alibi_max);
    float mx = NEG_INF;
    for (int s = threadIdx.x; s < width; s += blockDim.x) {
        unsigned p = pos[s];
        float x = row[s];
        if (softcap > 0.0f) x = softcap * tanhf(x / softcap);
        x += slope * ((float)p - (float)qpos);
        bool visible = p != FREE_SLOT && p <= qpos && (window == 0 || qpos - p < window);
        x = visible ? x : NEG_INF;
        row[s] = x;
        mx = fmaxf(mx, x);
    }
    mx = block_reduce(mx, true);
    float sum = 0.0f;
    for (int s = threadIdx.x; s < width; s += blockDim.x) sum += row[s] == NEG_INF ? 0.0f : expf(row[s] - mx);
    sum = block_reduce(sum, false);
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    if (score_mode == SCORE_RECONSTRUCTION) {
        // The exponentials' common factor e^-mx cancels in the restricted softmax.
        float sc = 0.0f;
        for (int s = threadIdx.x; s < width; s += blockDim.x) {
            unsigned p = pos[s];
            bool counted = p < sinks || (p >= first && p < end) || p >= from_pos;
            if (counted && row[s] != NEG_INF) sc += expf(row[s] - mx);
        }
        sc = block_reduce(sc, false);
        float invc = sc > 0.0f && qpos >= from_pos ? 1.0f / sc : 0.0f;
        for (int s = threadIdx.x; s < width; s += blockDim.x) {
            unsigned p = pos[s];
            float e = row[s] == NEG_INF ? 0.0f : expf(row[s] - mx);
            prow[s] = f2h(e * inv);
            row[s] = p >= first && p < end ? e * invc : 0.0f;
        }
        return;
    }
    if (score_mode != SCORE_KEYFORMER) {
        for (int s = threadIdx.x; s < width; s += blockDim.x) {
            float e = row[s] == NEG_INF ? 0.0f : expf(row[s] - mx) * inv;
            prow[s] = f2h(e);
            if (score_mode == SCORE_ATTENTION) row[s] = e;
        }
        return;
    }
    unsigned key = noise_row_key(seed, layer, h, qpos);
    float mn = NEG_INF;
    for (int s = threadIdx.x; s < width; s += blockDim.x) {
        float x = row[s];
        prow[s] = f2h(x == NEG_INF ? 0.0f : expf(x - mx) * inv);
        float y = x == NEG_INF ? NEG_INF : (x + gumbel_table[position_hash(key, pos[s]) >> (32 - table_bits)]) * inv_tau;
        row[s] = y;
        mn = fmaxf(mn, y);
    }
    mn = block_reduce(mn, true);
    float sn = 0.0f;
    for (int s = threadIdx.x; s < width; s += blockDim.x) sn += row[s] == NEG_INF ? 0.0f : expf(row[s] - mn);
    sn = block_reduce(sn, false);
    float invn = sn > 0.0f ? 1.0f / sn : 0.0f;
    for (int s = threadIdx.x; s < width; s += blockDim.x) row[s] = row[s] == NEG_INF ? 0.0f : expf(row[s] - mn) * invn;
}

// Prefill scores: scores[g][s] += the scored probabilities of slot s summed over g's query
// heads and the rows, in a fixed order (no atomics); with `by_max` (KVzip's), the largest of
// them and of scores[g][s] instead; thread (g, s).
extern "C" __global__ void prefill_scores(const float* S, float* scores, int n_heads, int n_kv_heads, int rows,
                                          int width, int capacity, int by_max) {
    int g = blockIdx.x, s = blockIdx.y * blockDim.x + threadIdx.x;
    if (s >= width) return;
    int group = n_heads / n_kv_heads;
    float acc = 0.0f;
    for (int j = 0; j < group; j++)
        for (int r = 0; r < rows; r++) {
            float x = S[((size_t)(g * group + j) * rows + r) * width + s];
            acc = by_max ? fmaxf(acc, x) : acc + x;
        }
    float* at = scores + (size_t)g * capacity + s;
    *at = by_max ? fmaxf(*at, acc) : *at + acc;
}

// The index of each row's largest value (the first of equal maxima); one block per row.
extern "C" __global__ void argmax_rows(const float* x, int n_cols, unsigned* out) {
    __shared__ unsigned long long partial[32];
    const float* row = x + (size_t)blockIdx.x * n_cols;
    // Packed (value in total order, inverted index): the largest key is the first maximum.
    unsigned long long best = 0;
    for (int i = threadIdx.x; i < n_cols; i += blockDim.x) {
        unsigned long long key = ((unsigned long long)total_order_bits(row[i]) << 32) | (0xffffffffu - (unsigned)i);
        best = key > best ? key : best;
    }
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long w = __shfl_xor_sync(0xffffffffu, best, o);
        best = w > best ? w : best;
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) best = partial[w] > best ? partial[w] : best;
        best = partial[0] > best ? partial[0] : best;
        out[blockIdx.x] = 0xffffffffu - (unsigned)(best & 0xffffffffu);
    }
}

// x += y.
extern "C" __global__ void add_assign(float* x, const float* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// Random weights (`random_weights::value` on the host): element i of tensor `tensor` is
// ((top 24 bits of mix64(seed ^ mix64(tensor) ^ i)) * 2^-24 * 2 - 1) * scale, rounded to f16.
extern "C" __global__ void fill_random_f16(unsigned short* w, long n, unsigned long long seed, unsigned tensor,
                                           float scale) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned long long h = mix64(seed ^ mix64((unsigned long long)tensor + 1) ^ (unsigned long long)i);
    float u = __fmul_rn((float)(h >> 40), 5.9604644775390625e-8f);
    float x = __fmul_rn(__fsub_rn(__fmul_rn(2.0f, u), 1.0f), scale);
    w[i] = f2h(x);
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
