// The prompt's attention without an n x n matrix (flash attention, tensor cores): one block of
// 4 warps per 64 query rows of one query head walks the KV head's slots 64 at a time, S = Q K^T
// and O += P V with mma.sync (f16 in, f32 out), the softmax kept online per row. A policy that
// scores needs each slot's probability under the row's *final* normaliser, which only exists
// after the last key tile: the first kernel writes each row's statistics (max and 1/sum, and
// Keyformer's noisy ones or KVzip's restricted sum), and `flash_scores` then walks each key
// tile over the rows again (S recomputed, never stored) and adds the column sums to the
// layer's scores in a fixed order, no atomics.
//
// The logits are those of prefill_softmax (kernels.cu): scaled, soft-capped, ALiBi, masked by
// position (after the query, outside its window, free slots). Needs sm_80 or later; head_dim a
// multiple of 16, at most 128 (the host picks the cuBLAS path otherwise).

#define FLASH_ROWS 64
#define FLASH_SLOTS 64
#define FLASH_THREADS 128

// (Older GPUs compile a trap: the host never launches these kernels there.)
__device__ __forceinline__ void mma_16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#if __CUDA_ARCH__ < 800
    __trap();
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Four 8 x 8 f16 matrices from shared memory (lane i gives row i % 8 of matrix i / 8); the
// transposed form hands each lane a column pair instead of a row pair.
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const unsigned short* p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const unsigned short* p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// 16 bytes global -> shared without passing through registers (zeros when !valid).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// Wait until at most one committed group is still in flight.
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;"); }

__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ unsigned pack_f16x2(float lo, float hi) {
    return (unsigned)f2h(lo) | ((unsigned)f2h(hi) << 16);
}

#define FLASH_LOG2E 1.4426950408889634f

// What both kernels need to turn a raw q.k into the softmax's logit and the policy's. The
// softmaxes run in base 2: logits are kept multiplied by log2(e).
struct FlashLogits {
    float scale, softcap, slope, inv_tau;
    unsigned window;
    int mode;
    const float* gumbel_table;
    int table_bits;
    unsigned sinks, first, end, from_pos;
};

// Whether the query at qpos sees a slot holding position p.
__device__ __forceinline__ bool flash_sees(const FlashLogits& f, unsigned qpos, unsigned p) {
    return p != FREE_SLOT && p <= qpos && (f.window == 0 || qpos - p < f.window);
}

// The base-2 logit of q.k = `dot` for a query at qpos and a slot holding p, visible or not
// (the same arithmetic in both kernels, so their probabilities agree).
__device__ __forceinline__ float flash_logit2(const FlashLogits& f, float dot, unsigned qpos, unsigned p) {
    if (f.softcap == 0.0f && f.slope == 0.0f) return dot * (f.scale * FLASH_LOG2E);
    float x = dot * f.scale;
    if (f.softcap > 0.0f) x = f.softcap * tanhf(x / f.softcap);
    x += f.slope * ((float)p - (float)qpos);
    return x * FLASH_LOG2E;
}

// Keyformer's (x + g) / tau in base 2, from the base-2 logit x2.
__device__ __forceinline__ float flash_noisy2(const FlashLogits& f, float x2, unsigned key, unsigned p) {
    return x2 == NEG_INF
               ? NEG_INF
               : fmaf(f.gumbel_table[position_hash(key, p) >> (32 - f.table_bits)], f.inv_tau * FLASH_LOG2E,
                      x2 * f.inv_tau);
}

__device__ __forceinline__ bool flash_counted(const FlashLogits& f, unsigned p) {
    return p < f.sinks || (p >= f.first && p < f.end) || p >= f.from_pos;
}

// A 64-slot tile of a KV head's keys or values into shared memory, asynchronously (rows of
// HD + 8 halves, so the 8 rows an ldmatrix reads fall in different banks); slots past `width`
// are zeros.
template <int HD>
__device__ __forceinline__ void flash_load_tile(unsigned short (*dst)[HD + 8], const unsigned short* src, int t0,
                                                int width) {
    constexpr int VECS = HD / 8;
    for (int i = threadIdx.x; i < FLASH_SLOTS * VECS; i += FLASH_THREADS) {
        int s = i / VECS, c = (i % VECS) * 8;
        bool valid = t0 + s < width;
        cp_async16(&dst[s][c], valid ? src + (size_t)(t0 + s) * HD + c : src, valid);
    }
}

// S (16 rows x 64 slots, per warp) = the warp's query fragments times the tile's keys (two
// 8-slot column tiles' B fragments per ldmatrix). The head's 16-wide slices are the outer
// loop: each slice's 8 products go to 8 different accumulators, none waiting on another
// (slots outermost made chains of HD / 16 dependent products).
template <int HD>
__device__ __forceinline__ void flash_qk(float (*s)[4], const unsigned (*qf)[4], const unsigned short (*ks)[HD + 8]) {
    int lane = threadIdx.x & 31, mi = lane >> 3;
#pragma unroll
    for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        unsigned b[4][4];
#pragma unroll
        for (int j = 0; j < 8; j += 2) ldmatrix_x4(b[j >> 1], &ks[8 * (j + (mi >> 1)) + (lane & 7)][16 * kk + (mi & 1) * 8]);
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
            mma_16816(s[j], qf[kk], b[j >> 1][0], b[j >> 1][1]);
            mma_16816(s[j + 1], qf[kk], b[j >> 1][2], b[j >> 1][3]);
        }
    }
}

// One tile's step of the online softmax for a thread's two rows (a: s[j][0..1], b: s[j][2..3],
// each row spread over the 4 lanes of its quad): the tile's maxima join the running ones m_a
// and m_b, and alpha_a, alpha_b are what the earlier sums scale by (1 while a row has seen
// nothing).
__device__ __forceinline__ void flash_online_max(const float (*s)[4], float& m_a, float& m_b, float& alpha_a,
                                                 float& alpha_b) {
    float t_a = NEG_INF, t_b = NEG_INF;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        t_a = fmaxf(t_a, fmaxf(s[j][0], s[j][1]));
        t_b = fmaxf(t_b, fmaxf(s[j][2], s[j][3]));
    }
    t_a = fmaxf(t_a, __shfl_xor_sync(0xffffffffu, t_a, 1));
    t_a = fmaxf(t_a, __shfl_xor_sync(0xffffffffu, t_a, 2));
    t_b = fmaxf(t_b, __shfl_xor_sync(0xffffffffu, t_b, 1));
    t_b = fmaxf(t_b, __shfl_xor_sync(0xffffffffu, t_b, 2));
    float n_a = fmaxf(m_a, t_a), n_b = fmaxf(m_b, t_b);
    alpha_a = n_a == NEG_INF ? 1.0f : exp2_approx(m_a - n_a);
    alpha_b = n_b == NEG_INF ? 1.0f : exp2_approx(m_b - n_b);
    m_a = n_a;
    m_b = n_b;
}

// Tile t0's slot positions into `pos` (threads < 64); whether any row in qpos lo..hi sees any
// of its slots (the result, block-uniform) and whether every row sees every slot (*every).
__device__ __forceinline__ bool flash_tile_seen(const FlashLogits& f, const unsigned* ph, int t0, int width,
                                                unsigned q_lo, unsigned q_hi, unsigned* pos, bool* every) {
    bool seen = false, all = true;
    if (threadIdx.x < FLASH_SLOTS) {
        unsigned p = t0 + threadIdx.x < width ? ph[t0 + threadIdx.x] : FREE_SLOT;
        pos[threadIdx.x] = p;
        seen = p != FREE_SLOT && p <= q_hi && (f.window == 0 || p + f.window > q_lo);
        all = p != FREE_SLOT && p <= q_lo && (f.window == 0 || p + f.window > q_hi);
    }
    seen = __syncthreads_or(seen);
    *every = __syncthreads_and(all);
    return seen;
}

// Block (64 query rows, query head h): out[r][h * HD..] = softmax(logits) V (and its f16 copy
// into out16 when not null), and with a score
// mode, stats[h][r] = (max, 1 / sum, noisy max, 1 / noisy sum) (Keyformer) or (max, 1 / sum,
// 0, 1 / restricted sum) (KVzip's reconstruction; 0 for rows before from_pos), maxima of
// base-2 logits. Tiles no row sees are skipped; K of the next tile and V of this one load
// while the tensor cores work. Row tiles run last first: under the causal mask the last rows
// see the most slots, and the short ones then fill the GPU's tail. Without EXTRA (the host's
// choice for no score or H2O's) Keyformer's noisy sums and KVzip's restricted ones are compiled
// out: fewer registers.
template <int HD, bool EXTRA>
__device__ __forceinline__ void flash_prefill_body(const unsigned short* q16, const unsigned short* keys,
                                                   const unsigned short* values, const unsigned* slot_pos,
                                                   float* out, unsigned short* out16, float4* stats, int n_heads,
                                                   int n_kv_heads, int rows, int width, int capacity,
                                                   unsigned first_qpos, FlashLogits f, unsigned long long seed,
                                                   unsigned layer) {
    __shared__ __align__(16) unsigned short ks[FLASH_SLOTS][HD + 8];
    __shared__ __align__(16) unsigned short vs[FLASH_SLOTS][HD + 8];
    __shared__ unsigned pos_s[2][FLASH_SLOTS];
    int h = blockIdx.y, g = h / (n_heads / n_kv_heads);
    int r0 = (gridDim.x - 1 - blockIdx.x) * FLASH_ROWS, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int gi = lane >> 2, ti = lane & 3;
    int q_dim = n_heads * HD;
    const unsigned short* kh = keys + (size_t)g * capacity * HD;
    const unsigned short* vh = values + (size_t)g * capacity * HD;
    const unsigned* ph = slot_pos + (size_t)g * capacity;

    // The block's queries (rows past `rows` zero) through shared memory into A fragments.
    for (int i = threadIdx.x; i < FLASH_ROWS * (HD / 8); i += FLASH_THREADS) {
        int r = i / (HD / 8), c = (i % (HD / 8)) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < rows) v = *(const uint4*)(q16 + (size_t)(r0 + r) * q_dim + h * HD + c);
        *(uint4*)&ks[r][c] = v;
    }
    __syncthreads();
    unsigned qf[HD / 16][4];
    int wr = warp * 16 + gi;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        qf[kk][0] = *(const unsigned*)&ks[wr][16 * kk + 2 * ti];
        qf[kk][1] = *(const unsigned*)&ks[wr + 8][16 * kk + 2 * ti];
        qf[kk][2] = *(const unsigned*)&ks[wr][16 * kk + 8 + 2 * ti];
        qf[kk][3] = *(const unsigned*)&ks[wr + 8][16 * kk + 8 + 2 * ti];
    }
    __syncthreads();

    // This thread's two rows: a (gi) and b (gi + 8) of the warp's 16.
    int ra = r0 + wr, rb = ra + 8;
    unsigned qa = first_qpos + ra, qb = first_qpos + rb;
    bool keyformer = EXTRA && f.mode == SCORE_KEYFORMER, restricted = EXTRA && f.mode == SCORE_RECONSTRUCTION;
    bool plain = f.softcap == 0.0f && f.slope == 0.0f;
    unsigned key_a = keyformer ? noise_row_key(seed, layer, h, qa) : 0u;
    unsigned key_b = keyformer ? noise_row_key(seed, layer, h, qb) : 0u;
    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.0f, l_b = 0.0f;
    float mn_a = NEG_INF, mn_b = NEG_INF, ln_a = 0.0f, ln_b = 0.0f, sc_a = 0.0f, sc_b = 0.0f;
    int last_row = min(r0 + FLASH_ROWS, rows) - 1;
    unsigned q_lo = first_qpos + r0, q_hi = first_qpos + last_row;
    float scale2 = f.scale * FLASH_LOG2E;

    int buf = 0, t0 = 0;
    bool every;
    while (t0 < width && !flash_tile_seen(f, ph, t0, width, q_lo, q_hi, pos_s[buf], &every)) t0 += FLASH_SLOTS;
    if (t0 < width) flash_load_tile<HD>(ks, kh, t0, width);
    cp_async_commit();
    while (t0 < width) {
        const unsigned* pos = pos_s[buf];
        flash_load_tile<HD>(vs, vh, t0, width);
        cp_async_commit();
        cp_async_wait_one();  // this tile's keys
        __syncthreads();
        float s[8][4];
        flash_qk<HD>(s, qf, ks);
        __syncthreads();  // every warp is done with the keys: the next tile's may come in
        int t_next = t0 + FLASH_SLOTS;
        bool every_next = false;
        while (t_next < width && !flash_tile_seen(f, ph, t_next, width, q_lo, q_hi, pos_s[buf ^ 1], &every_next))
            t_next += FLASH_SLOTS;
        if (t_next < width) flash_load_tile<HD>(ks, kh, t_next, width);
        cp_async_commit();

        if (every && plain) {
            // Every row sees every slot: no mask, no position.
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int c = 0; c < 4; c++) s[j][c] *= scale2;
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                unsigned p0 = pos[8 * j + 2 * ti], p1 = pos[8 * j + 2 * ti + 1];
                s[j][0] = flash_sees(f, qa, p0) ? flash_logit2(f, s[j][0], qa, p0) : NEG_INF;
                s[j][1] = flash_sees(f, qa, p1) ? flash_logit2(f, s[j][1], qa, p1) : NEG_INF;
                s[j][2] = flash_sees(f, qb, p0) ? flash_logit2(f, s[j][2], qb, p0) : NEG_INF;
                s[j][3] = flash_sees(f, qb, p1) ? flash_logit2(f, s[j][3], qb, p1) : NEG_INF;
            }
        }
        float alpha_a, alpha_b;
        flash_online_max(s, m_a, m_b, alpha_a, alpha_b);
        // Rows that have seen nothing yet keep (max -inf, sums 0): their exponentials are taken
        // against 0, and exp2(-inf) is 0.
        float base_a = m_a == NEG_INF ? 0.0f : m_a, base_b = m_b == NEG_INF ? 0.0f : m_b;
        float sum_a = 0.0f, sum_b = 0.0f, cnt_a = 0.0f, cnt_b = 0.0f;
        unsigned pf[4][4];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float e0 = exp2_approx(s[j][0] - base_a), e1 = exp2_approx(s[j][1] - base_a);
            float e2 = exp2_approx(s[j][2] - base_b), e3 = exp2_approx(s[j][3] - base_b);
            sum_a += e0 + e1;
            sum_b += e2 + e3;
            if (restricted) {
                unsigned p0 = pos[8 * j + 2 * ti], p1 = pos[8 * j + 2 * ti + 1];
                bool c0 = flash_counted(f, p0), c1 = flash_counted(f, p1);
                cnt_a += (c0 ? e0 : 0.0f) + (c1 ? e1 : 0.0f);
                cnt_b += (c0 ? e2 : 0.0f) + (c1 ? e3 : 0.0f);
            }
            if (keyformer) {
                // Noisy logits kept back in s (the P fragments below are already built from e).
                unsigned p0 = pos[8 * j + 2 * ti], p1 = pos[8 * j + 2 * ti + 1];
                s[j][0] = flash_noisy2(f, s[j][0], key_a, p0);
                s[j][1] = flash_noisy2(f, s[j][1], key_a, p1);
                s[j][2] = flash_noisy2(f, s[j][2], key_b, p0);
                s[j][3] = flash_noisy2(f, s[j][3], key_b, p1);
            }
            // The A fragment of P for slots 16 * (j / 2)..: registers 0, 1 from the even tile,
            // 2, 3 from the odd one.
            pf[j >> 1][(j & 1) * 2] = pack_f16x2(e0, e1);
            pf[j >> 1][(j & 1) * 2 + 1] = pack_f16x2(e2, e3);
        }
        l_a = l_a * alpha_a + sum_a;
        l_b = l_b * alpha_b + sum_b;
        sc_a = sc_a * alpha_a + cnt_a;
        sc_b = sc_b * alpha_b + cnt_b;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            o[n][0] *= alpha_a;
            o[n][1] *= alpha_a;
            o[n][2] *= alpha_b;
            o[n][3] *= alpha_b;
        }
        if (keyformer) {
            float beta_a, beta_b;
            flash_online_max(s, mn_a, mn_b, beta_a, beta_b);
            float nb_a = mn_a == NEG_INF ? 0.0f : mn_a, nb_b = mn_b == NEG_INF ? 0.0f : mn_b;
            float ns_a = 0.0f, ns_b = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                ns_a += exp2_approx(s[j][0] - nb_a) + exp2_approx(s[j][1] - nb_a);
                ns_b += exp2_approx(s[j][2] - nb_b) + exp2_approx(s[j][3] - nb_b);
            }
            ln_a = ln_a * beta_a + ns_a;
            ln_b = ln_b * beta_b + ns_b;
        }
        cp_async_wait_one();  // this tile's values (the next tile's keys may still be coming)
        __syncthreads();
        // O += P V: V's fragments by transposed ldmatrix, two 8-wide column tiles at a time.
#pragma unroll
        for (int kk = 0; kk < FLASH_SLOTS / 16; kk++) {
#pragma unroll
            for (int n2 = 0; n2 < HD / 16; n2++) {
                unsigned b[4];
                int slot = 16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8, col = 16 * n2 + (lane >> 4) * 8;
                ldmatrix_x4_trans(b, &vs[slot][col]);
                mma_16816(o[2 * n2], pf[kk], b[0], b[1]);
                mma_16816(o[2 * n2 + 1], pf[kk], b[2], b[3]);
            }
        }
        __syncthreads();  // the values' buffer is free for the next tile
        t0 = t_next;
        every = every_next;
        buf ^= 1;
    }
    // Each row's sums are spread over the 4 lanes of its quad.
    for (int x = 1; x <= 2; x <<= 1) {
        l_a += __shfl_xor_sync(0xffffffffu, l_a, x);
        l_b += __shfl_xor_sync(0xffffffffu, l_b, x);
        ln_a += __shfl_xor_sync(0xffffffffu, ln_a, x);
        ln_b += __shfl_xor_sync(0xffffffffu, ln_b, x);
        sc_a += __shfl_xor_sync(0xffffffffu, sc_a, x);
        sc_b += __shfl_xor_sync(0xffffffffu, sc_b, x);
    }
    float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f, inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
        int c = h * HD + 8 * n + 2 * ti;
        float2 va = make_float2(o[n][0] * inv_a, o[n][1] * inv_a), vb = make_float2(o[n][2] * inv_b, o[n][3] * inv_b);
        if (ra < rows) *(float2*)&out[(size_t)ra * q_dim + c] = va;
        if (rb < rows) *(float2*)&out[(size_t)rb * q_dim + c] = vb;
        if (out16 && ra < rows) *(unsigned*)&out16[(size_t)ra * q_dim + c] = pack_f16x2(va.x, va.y);
        if (out16 && rb < rows) *(unsigned*)&out16[(size_t)rb * q_dim + c] = pack_f16x2(vb.x, vb.y);
    }
    if (f.mode == SCORE_NONE || ti != 0) return;
    float third_a = keyformer ? mn_a : 0.0f, third_b = keyformer ? mn_b : 0.0f;
    float fourth_a = keyformer ? (ln_a > 0.0f ? 1.0f / ln_a : 0.0f) : (sc_a > 0.0f && qa >= f.from_pos ? 1.0f / sc_a : 0.0f);
    float fourth_b = keyformer ? (ln_b > 0.0f ? 1.0f / ln_b : 0.0f) : (sc_b > 0.0f && qb >= f.from_pos ? 1.0f / sc_b : 0.0f);
    if (ra < rows) stats[(size_t)h * rows + ra] = make_float4(m_a, inv_a, third_a, fourth_a);
    if (rb < rows) stats[(size_t)h * rows + rb] = make_float4(m_b, inv_b, third_b, fourth_b);
}

// The lean prompt kernel at twice the rows (no score or H2O's): a block of 4 warps per 128 query
// rows, each warp two 16-row tiles, so every key and value fragment read from shared memory
// feeds two products (one in the 64-row kernels) and each warp has twice the independent work
// between its barriers. The queries stay in shared memory (dynamic: 2 x 64 + 128 rows of
// HD + 8 halves), read again by ldmatrix for every key tile, which leaves the registers to the
// two tiles' outputs.
#define FLASH_WIDE_ROWS 128

// S of both 16-row tiles of a warp (rows row0.., row0 + 16..) against the tile's keys.
template <int HD>
__device__ __forceinline__ void flash_qk_wide(float (*s)[8][4], const unsigned short (*qs)[HD + 8],
                                              const unsigned short (*ks)[HD + 8], int row0) {
    int lane = threadIdx.x & 31, mi = lane >> 3;
#pragma unroll
    for (int t = 0; t < 2; t++)
#pragma unroll
        for (int j = 0; j < 8; j++) s[t][j][0] = s[t][j][1] = s[t][j][2] = s[t][j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        // A fragments: lane l gives row l % 16 of the tile, columns from 8 * (l / 16).
        unsigned a[2][4];
#pragma unroll
        for (int t = 0; t < 2; t++) ldmatrix_x4(a[t], &qs[row0 + 16 * t + (lane & 15)][16 * kk + (lane >> 4) * 8]);
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
            unsigned b[4];
            ldmatrix_x4(b, &ks[8 * (j + (mi >> 1)) + (lane & 7)][16 * kk + (mi & 1) * 8]);
#pragma unroll
            for (int t = 0; t < 2; t++) {
                mma_16816(s[t][j], a[t], b[0], b[1]);
                mma_16816(s[t][j + 1], a[t], b[2], b[3]);
            }
        }
    }
}

// Block (128 query rows, query head h): as flash_prefill_body without EXTRA.
template <int HD>
__device__ __forceinline__ void flash_prefill_wide_body(const unsigned short* q16, const unsigned short* keys,
                                                        const unsigned short* values, const unsigned* slot_pos,
                                                        float* out, unsigned short* out16, float4* stats,
                                                        int n_heads, int n_kv_heads, int rows, int width,
                                                        int capacity, unsigned first_qpos, FlashLogits f) {
    extern __shared__ __align__(16) unsigned short flash_wide_smem[];
    unsigned short(*qs)[HD + 8] = (unsigned short(*)[HD + 8])flash_wide_smem;
    unsigned short(*ks)[HD + 8] = qs + FLASH_WIDE_ROWS;
    unsigned short(*vs)[HD + 8] = ks + FLASH_SLOTS;
    __shared__ unsigned pos_s[2][FLASH_SLOTS];
    int h = blockIdx.y, g = h / (n_heads / n_kv_heads);
    int r0 = (gridDim.x - 1 - blockIdx.x) * FLASH_WIDE_ROWS, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int gi = lane >> 2, ti = lane & 3;
    int q_dim = n_heads * HD;
    const unsigned short* kh = keys + (size_t)g * capacity * HD;
    const unsigned short* vh = values + (size_t)g * capacity * HD;
    const unsigned* ph = slot_pos + (size_t)g * capacity;

    // The block's queries (rows past `rows` zero); the first tile's barrier publishes them.
    for (int i = threadIdx.x; i < FLASH_WIDE_ROWS * (HD / 8); i += FLASH_THREADS) {
        int r = i / (HD / 8), c = (i % (HD / 8)) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < rows) v = *(const uint4*)(q16 + (size_t)(r0 + r) * q_dim + h * HD + c);
        *(uint4*)&qs[r][c] = v;
    }

    // This thread's rows: in tile t, a (gi) and b (gi + 8) of the tile's 16.
    int ra[2], rb[2];
    unsigned qa[2], qb[2];
#pragma unroll
    for (int t = 0; t < 2; t++) {
        ra[t] = r0 + warp * 32 + 16 * t + gi;
        rb[t] = ra[t] + 8;
        qa[t] = first_qpos + ra[t];
        qb[t] = first_qpos + rb[t];
    }
    bool plain = f.softcap == 0.0f && f.slope == 0.0f;
    float o[2][HD / 8][4];
#pragma unroll
    for (int t = 0; t < 2; t++)
#pragma unroll
        for (int n = 0; n < HD / 8; n++) o[t][n][0] = o[t][n][1] = o[t][n][2] = o[t][n][3] = 0.0f;
    float m_a[2] = {NEG_INF, NEG_INF}, m_b[2] = {NEG_INF, NEG_INF}, l_a[2] = {0.0f, 0.0f}, l_b[2] = {0.0f, 0.0f};
    int last_row = min(r0 + FLASH_WIDE_ROWS, rows) - 1;
    unsigned q_lo = first_qpos + r0, q_hi = first_qpos + last_row;
    float scale2 = f.scale * FLASH_LOG2E;

    int buf = 0, t0 = 0;
    bool every;
    while (t0 < width && !flash_tile_seen(f, ph, t0, width, q_lo, q_hi, pos_s[buf], &every)) t0 += FLASH_SLOTS;
    if (t0 < width) flash_load_tile<HD>(ks, kh, t0, width);
    cp_async_commit();
    while (t0 < width) {
        const unsigned* pos = pos_s[buf];
        flash_load_tile<HD>(vs, vh, t0, width);
        cp_async_commit();
        cp_async_wait_one();  // this tile's keys
        __syncthreads();
        float s[2][8][4];
        flash_qk_wide<HD>(s, qs, ks, warp * 32);
        __syncthreads();  // every warp is done with the keys: the next tile's may come in
        int t_next = t0 + FLASH_SLOTS;
        bool every_next = false;
        while (t_next < width && !flash_tile_seen(f, ph, t_next, width, q_lo, q_hi, pos_s[buf ^ 1], &every_next))
            t_next += FLASH_SLOTS;
        if (t_next < width) flash_load_tile<HD>(ks, kh, t_next, width);
        cp_async_commit();

        unsigned pf[2][4][4];
#pragma unroll
        for (int t = 0; t < 2; t++) {
            if (every && plain) {
#pragma unroll
                for (int j = 0; j < 8; j++)
#pragma unroll
                    for (int c = 0; c < 4; c++) s[t][j][c] *= scale2;
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    unsigned p0 = pos[8 * j + 2 * ti], p1 = pos[8 * j + 2 * ti + 1];
                    s[t][j][0] = flash_sees(f, qa[t], p0) ? flash_logit2(f, s[t][j][0], qa[t], p0) : NEG_INF;
                    s[t][j][1] = flash_sees(f, qa[t], p1) ? flash_logit2(f, s[t][j][1], qa[t], p1) : NEG_INF;
                    s[t][j][2] = flash_sees(f, qb[t], p0) ? flash_logit2(f, s[t][j][2], qb[t], p0) : NEG_INF;
                    s[t][j][3] = flash_sees(f, qb[t], p1) ? flash_logit2(f, s[t][j][3], qb[t], p1) : NEG_INF;
                }
            }
            float alpha_a, alpha_b;
            flash_online_max(s[t], m_a[t], m_b[t], alpha_a, alpha_b);
            float base_a = m_a[t] == NEG_INF ? 0.0f : m_a[t], base_b = m_b[t] == NEG_INF ? 0.0f : m_b[t];
            float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float e0 = exp2_approx(s[t][j][0] - base_a), e1 = exp2_approx(s[t][j][1] - base_a);
                float e2 = exp2_approx(s[t][j][2] - base_b), e3 = exp2_approx(s[t][j][3] - base_b);
                sum_a += e0 + e1;
                sum_b += e2 + e3;
                pf[t][j >> 1][(j & 1) * 2] = pack_f16x2(e0, e1);
                pf[t][j >> 1][(j & 1) * 2 + 1] = pack_f16x2(e2, e3);
            }
            l_a[t] = l_a[t] * alpha_a + sum_a;
            l_b[t] = l_b[t] * alpha_b + sum_b;
#pragma unroll
            for (int n = 0; n < HD / 8; n++) {
                o[t][n][0] *= alpha_a;
                o[t][n][1] *= alpha_a;
                o[t][n][2] *= alpha_b;
                o[t][n][3] *= alpha_b;
            }
        }
        cp_async_wait_one();  // this tile's values (the next tile's keys may still be coming)
        __syncthreads();
        // O += P V for both tiles: each V fragment serves four products.
#pragma unroll
        for (int kk = 0; kk < FLASH_SLOTS / 16; kk++) {
#pragma unroll
            for (int n2 = 0; n2 < HD / 16; n2++) {
                unsigned b[4];
                int slot = 16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8, col = 16 * n2 + (lane >> 4) * 8;
                ldmatrix_x4_trans(b, &vs[slot][col]);
#pragma unroll
                for (int t = 0; t < 2; t++) {
                    mma_16816(o[t][2 * n2], pf[t][kk], b[0], b[1]);
                    mma_16816(o[t][2 * n2 + 1], pf[t][kk], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // the values' buffer is free for the next tile
        t0 = t_next;
        every = every_next;
        buf ^= 1;
    }
#pragma unroll
    for (int t = 0; t < 2; t++) {
        float la = l_a[t], lb = l_b[t];
        for (int x = 1; x <= 2; x <<= 1) {
            la += __shfl_xor_sync(0xffffffffu, la, x);
            lb += __shfl_xor_sync(0xffffffffu, lb, x);
        }
        float inv_a = la > 0.0f ? 1.0f / la : 0.0f, inv_b = lb > 0.0f ? 1.0f / lb : 0.0f;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            int c = h * HD + 8 * n + 2 * ti;
            float2 va = make_float2(o[t][n][0] * inv_a, o[t][n][1] * inv_a);
            float2 vb = make_float2(o[t][n][2] * inv_b, o[t][n][3] * inv_b);
            if (ra[t] < rows) *(float2*)&out[(size_t)ra[t] * q_dim + c] = va;
            if (rb[t] < rows) *(float2*)&out[(size_t)rb[t] * q_dim + c] = vb;
            if (out16 && ra[t] < rows) *(unsigned*)&out16[(size_t)ra[t] * q_dim + c] = pack_f16x2(va.x, va.y);
            if (out16 && rb[t] < rows) *(unsigned*)&out16[(size_t)rb[t] * q_dim + c] = pack_f16x2(vb.x, vb.y);
        }
        // H2O's statistics (the 64-row kernels' layout, nothing in the last two).
        if (f.mode != SCORE_NONE && ti == 0) {
            if (ra[t] < rows) stats[(size_t)h * rows + ra[t]] = make_float4(m_a[t], inv_a, 0.0f, 0.0f);
            if (rb[t] < rows) stats[(size_t)h * rows + rb[t]] = make_float4(m_b[t], inv_b, 0.0f, 0.0f);
        }
    }
}

// Block (64 slots of KV head g): each slot's scored probability summed (or, `by_max`, the
// largest) over g's query heads and the rows, added to (merged into) scores[g][slot].
template <int HD>
__device__ __forceinline__ void flash_scores_body(const unsigned short* q16, const unsigned short* keys,
                                                  const unsigned* slot_pos, const float4* stats, float* scores,
                                                  int n_heads, int n_kv_heads, int rows, int width, int capacity,
                                                  unsigned first_qpos, FlashLogits f, unsigned long long seed,
                                                  unsigned layer, float alibi_max, int by_max) {
    __shared__ __align__(16) unsigned short ks[FLASH_SLOTS][HD + 8];
    __shared__ unsigned pos_s[FLASH_SLOTS];
    __shared__ float part[4][FLASH_SLOTS];
    __shared__ unsigned lo_s[4], hi_s[4];
    int g = blockIdx.y, group = n_heads / n_kv_heads, t0 = blockIdx.x * FLASH_SLOTS;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, ti = lane & 3;
    int q_dim = n_heads * HD;
    const unsigned* ph = slot_pos + (size_t)g * capacity;
    bool keyformer = f.mode == SCORE_KEYFORMER, restricted = f.mode == SCORE_RECONSTRUCTION;

    // The tile's lowest and highest held positions decide which row tiles can see it.
    unsigned lo = FREE_SLOT, hi = 0;
    bool any = false, full = true;
    if (threadIdx.x < FLASH_SLOTS) {
        unsigned p = t0 + threadIdx.x < width ? ph[t0 + threadIdx.x] : FREE_SLOT;
        pos_s[threadIdx.x] = p;
        bool held = p != FREE_SLOT && (!restricted || (p >= f.first && p < f.end));
        any = held;
        full = p != FREE_SLOT;
        if (p != FREE_SLOT) lo = hi = p;
    }
    for (int x = 16; x > 0; x >>= 1) {
        lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, x));
        hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, x));
    }
    if (lane == 0) {
        lo_s[warp] = lo;
        hi_s[warp] = hi;
    }
    full = __syncthreads_and(full);
    if (!__syncthreads_or(any)) return;  // nothing held that could score
    lo = min(min(lo_s[0], lo_s[1]), min(lo_s[2], lo_s[3]));
    hi = max(max(hi_s[0], hi_s[1]), max(hi_s[2], hi_s[3]));
    flash_load_tile<HD>(ks, keys + (size_t)g * capacity * HD, t0, width);
    cp_async_commit();
    asm volatile("cp.async.wait_group 0;");
    __syncthreads();

    float acc[8][2];
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j][0] = acc[j][1] = 0.0f;
    for (int jh = 0; jh < group; jh++) {
        int h = g * group + jh;
        FlashLogits fh = f;
        fh.slope = alibi_slope(h, n_heads, alibi_max);
        for (int r0 = 0; r0 < rows; r0 += FLASH_ROWS) {
            unsigned q_lo = first_qpos + r0, q_hi = first_qpos + min(r0 + FLASH_ROWS, rows) - 1;
            // Rows that see none of the tile, or (KVzip) score nothing, are skipped.
            if (q_hi < lo || (f.window != 0 && q_lo >= hi + f.window) || (restricted && q_hi < f.from_pos)) continue;
            // Every row sees every slot: no mask.
            bool every = full && hi <= q_lo && (f.window == 0 || lo + f.window > q_hi);
            int ra = r0 + warp * 16 + gi, rb = ra + 8;
            unsigned qf[HD / 16][4];
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                const unsigned short* qa_row = q16 + (size_t)ra * q_dim + h * HD + 16 * kk + 2 * ti;
                const unsigned short* qb_row = q16 + (size_t)rb * q_dim + h * HD + 16 * kk + 2 * ti;
                qf[kk][0] = ra < rows ? *(const unsigned*)qa_row : 0u;
                qf[kk][1] = rb < rows ? *(const unsigned*)qb_row : 0u;
                qf[kk][2] = ra < rows ? *(const unsigned*)(qa_row + 8) : 0u;
                qf[kk][3] = rb < rows ? *(const unsigned*)(qb_row + 8) : 0u;
            }
            float s[8][4];
            flash_qk<HD>(s, qf, ks);
            unsigned qa = first_qpos + ra, qb = first_qpos + rb;
            float4 sa = ra < rows ? stats[(size_t)h * rows + ra] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            float4 sb = rb < rows ? stats[(size_t)h * rows + rb] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            unsigned key_a = keyformer ? noise_row_key(seed, layer, h, qa) : 0u;
            unsigned key_b = keyformer ? noise_row_key(seed, layer, h, qb) : 0u;
#pragma unroll
            for (int j = 0; j < 8; j++) {
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    unsigned p = pos_s[8 * j + 2 * ti + c];
                    float xa = flash_logit2(fh, s[j][c], qa, p), xb = flash_logit2(fh, s[j][2 + c], qb, p);
                    if (!every) {
                        xa = flash_sees(fh, qa, p) ? xa : NEG_INF;
                        xb = flash_sees(fh, qb, p) ? xb : NEG_INF;
                    }
                    float ea, eb;
                    if (keyformer) {
                        ea = exp2_approx(flash_noisy2(fh, xa, key_a, p) - sa.z) * sa.w;
                        eb = exp2_approx(flash_noisy2(fh, xb, key_b, p) - sb.z) * sb.w;
                    } else if (restricted) {
                        bool part_slot = p >= f.first && p < f.end;
                        ea = part_slot ? exp2_approx(xa - sa.x) * sa.w : 0.0f;
                        eb = part_slot ? exp2_approx(xb - sb.x) * sb.w : 0.0f;
                    } else {
                        ea = exp2_approx(xa - sa.x) * sa.y;
                        eb = exp2_approx(xb - sb.x) * sb.y;
                    }
                    // (exp2 of a row past `rows` may overflow: inf * 0 would be NaN.)
                    ea = ra < rows ? ea : 0.0f;
                    eb = rb < rows ? eb : 0.0f;
                    acc[j][c] = by_max ? fmaxf(acc[j][c], fmaxf(ea, eb)) : acc[j][c] + ea + eb;
                }
            }
        }
    }
    // Over the 8 row groups of each warp, then the 4 warps, in a fixed order.
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int c = 0; c < 2; c++)
            for (int x = 4; x <= 16; x <<= 1) {
                float other = __shfl_xor_sync(0xffffffffu, acc[j][c], x);
                acc[j][c] = by_max ? fmaxf(acc[j][c], other) : acc[j][c] + other;
            }
    if (gi == 0) {
#pragma unroll
        for (int j = 0; j < 8; j++) {
            part[warp][8 * j + 2 * ti] = acc[j][0];
            part[warp][8 * j + 2 * ti + 1] = acc[j][1];
        }
    }
    __syncthreads();
    if (threadIdx.x < FLASH_SLOTS && t0 + threadIdx.x < width) {
        int i = threadIdx.x;
        float* at = scores + (size_t)g * capacity + t0 + i;
        if (by_max) *at = fmaxf(*at, fmaxf(fmaxf(part[0][i], part[1][i]), fmaxf(part[2][i], part[3][i])));
        else *at += ((part[0][i] + part[1][i]) + part[2][i]) + part[3][i];
    }
}

#define FLASH_PREFILL_KERNEL(NAME, HD, EXTRA, MIN_BLOCKS)                                                        \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS, MIN_BLOCKS) NAME(                                 \
        const unsigned short* q16, const unsigned short* keys, const unsigned short* values,                     \
        const unsigned* slot_pos, float* out, unsigned short* out16, float4* stats, int n_heads, int n_kv_heads, \
        int rows, int width, int capacity, unsigned first_qpos, int mode, float scale, float inv_tau,             \
        unsigned long long seed, unsigned layer, const float* gumbel_table, int table_bits, float softcap,        \
        unsigned window, float alibi_max, unsigned sinks, unsigned first, unsigned end, unsigned from_pos) {      \
        FlashLogits f = {scale, softcap, alibi_slope(blockIdx.y, n_heads, alibi_max), inv_tau, window, mode,     \
                         gumbel_table, table_bits, sinks, first, end, from_pos};                                 \
        flash_prefill_body<HD, EXTRA>(q16, keys, values, slot_pos, out, out16, stats, n_heads, n_kv_heads, rows, \
                                      width, capacity, first_qpos, f, seed, layer);                              \
    }

#define FLASH_KERNELS(HD)                                                                                          \
    FLASH_PREFILL_KERNEL(flash_prefill_hd##HD, HD, true, 1)                                                      \
    FLASH_PREFILL_KERNEL(flash_prefill_lean_hd##HD, HD, false, 1)                                                \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_prefill_wide_hd##HD(                       \
        const unsigned short* q16, const unsigned short* keys, const unsigned short* values,                     \
        const unsigned* slot_pos, float* out, unsigned short* out16, float4* stats, int n_heads, int n_kv_heads, \
        int rows, int width, int capacity, unsigned first_qpos, int mode, float scale, float softcap,             \
        unsigned window, float alibi_max) {                                                                       \
        FlashLogits f = {scale, softcap, alibi_slope(blockIdx.y, n_heads, alibi_max), 1.0f, window, mode,        \
                         nullptr, 0, 0, 0, 0, 0};                                                                \
        flash_prefill_wide_body<HD>(q16, keys, values, slot_pos, out, out16, stats, n_heads, n_kv_heads, rows,    \
                                    width, capacity, first_qpos, f);                                             \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS) flash_scores_hd##HD(                             \
        const unsigned short* q16, const unsigned short* keys, const unsigned* slot_pos, const float4* stats,    \
        float* scores, int n_heads, int n_kv_heads, int rows, int width, int capacity, unsigned first_qpos,      \
        int mode, float scale, float inv_tau, unsigned long long seed, unsigned layer,                           \
        const float* gumbel_table, int table_bits, float softcap, unsigned window, float alibi_max,               \
        unsigned sinks, unsigned first, unsigned end, unsigned from_pos, int by_max) {                           \
        FlashLogits f = {scale, softcap, 0.0f, inv_tau, window, mode, gumbel_table, table_bits,                  \
                         sinks, first, end, from_pos};                                                           \
        flash_scores_body<HD>(q16, keys, slot_pos, stats, scores, n_heads, n_kv_heads, rows, width, capacity,    \
                              first_qpos, f, seed, layer, alibi_max, by_max);                                    \
    }

FLASH_KERNELS(16)
FLASH_KERNELS(32)
FLASH_KERNELS(64)
FLASH_KERNELS(80)
FLASH_KERNELS(96)
FLASH_KERNELS(128)
