// ggml's quantised blocks read 32 values at a time, for the kernels of quant.cu. Plain C++ over
// two helpers its includer defines, h2f (an f16's bits to f32) and dp4a (four signed byte
// products added to an int): on the GPU kernels.cu defines them in PTX; the host test
// (tests/cuda_blocks_host.rs) compiles this file with a C++ compiler and checks it against
// quant/scalar.rs and quant/dot.rs.
//
// A weight row of a quantised type is read as "sub-blocks" of 32 values (a whole block of the
// legacy types, an eighth of a K-quant super-block): 8 words of 4 signed bytes and the scales,
// value i = (i < 16 ? d0 : d1) * q_i + m. Products take the activations quantised as the CPU
// does (quant/dot.rs Q8Block: 32 signed bytes, a scale d and d * their sum), so a sub-block's
// dot is two integer sums of 4 dp4a each, d_a * (d0 * s0 + d1 * s1) + m * sum_a: the CPU
// kernels' integer sums exactly, combined in another order.
// Type codes are ggml's: Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12, Q5_K 13, Q6_K 14.

struct Q8Act {
    float d;
    float sum;
    int qs[8];
};

struct Sub32 {
    int q[8];
    float d0, d1, m;
};

// Blocks of 18, 22, 34 and 210 bytes are only 2-byte aligned: words are read as two halves.
__device__ __forceinline__ unsigned int ld_u16x2(const unsigned char* p) {
    const unsigned short* s = (const unsigned short*)p;
    return (unsigned int)s[0] | ((unsigned int)s[1] << 16);
}
__device__ __forceinline__ unsigned int ld_u32(const unsigned char* p) { return *(const unsigned int*)p; }
__device__ __forceinline__ float ld_f16(const unsigned char* p) { return h2f(*(const unsigned short*)p); }

// Bytes v (each 0..127) minus c (at most 64) per byte, as signed bytes, with no borrow between
// bytes: (v + 128 - c) stays within its byte, and flipping bit 7 takes the 128 back.
__device__ __forceinline__ int bytes_minus(unsigned int v, unsigned int c) {
    return (int)(((v | 0x80808080u) - c * 0x01010101u) ^ 0x80808080u);
}

// Four fifth bits (bits 0..3 of b) to bit 4 of each byte.
__device__ __forceinline__ unsigned int spread_fifth_bits(unsigned int b) {
    return ((b & 1u) << 4) | ((b & 2u) << 11) | ((b & 4u) << 18) | ((b & 8u) << 25);
}

// Scale and min j (0..7) of a Q4_K/Q5_K super-block's 12 scale bytes.
__device__ __forceinline__ void scale_min_k4(const unsigned char* q, int j, int* sc, int* mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

template <int T>
__device__ __forceinline__ Sub32 load_sub(const unsigned char* row, int j) {
    Sub32 s;
    s.m = 0.0f;
    if (T == 2) {  // Q4_0: d, 16 bytes of nibbles (low: values 0..15, high: 16..31), q - 8
        const unsigned char* b = row + 18 * j;
        s.d0 = s.d1 = ld_f16(b);
#pragma unroll
        for (int w = 0; w < 4; w++) {
            unsigned int u = ld_u16x2(b + 2 + 4 * w);
            s.q[w] = bytes_minus(u & 0x0F0F0F0Fu, 8);
            s.q[w + 4] = bytes_minus((u >> 4) & 0x0F0F0F0Fu, 8);
        }
    } else if (T == 3) {  // Q4_1: d, m, nibbles
        const unsigned char* b = row + 20 * j;
        s.d0 = s.d1 = ld_f16(b);
        s.m = ld_f16(b + 2);
#pragma unroll
        for (int w = 0; w < 4; w++) {
            unsigned int u = ld_u32(b + 4 + 4 * w);
            s.q[w] = (int)(u & 0x0F0F0F0Fu);
            s.q[w + 4] = (int)((u >> 4) & 0x0F0F0F0Fu);
        }
    } else if (T == 6 || T == 7) {  // Q5_0: d, 32 fifth bits, nibbles, q - 16; Q5_1: d, m, ..., q
        const int size = T == 6 ? 22 : 24, qh_at = T == 6 ? 2 : 4;
        const unsigned char* b = row + size * j;
        s.d0 = s.d1 = ld_f16(b);
        if (T == 7) s.m = ld_f16(b + 2);
        unsigned int qh = ld_u16x2(b + qh_at);
#pragma unroll
        for (int w = 0; w < 4; w++) {
            unsigned int u = ld_u16x2(b + qh_at + 4 + 4 * w);
            unsigned int lo = (u & 0x0F0F0F0Fu) | spread_fifth_bits((qh >> (4 * w)) & 15u);
            unsigned int hi = ((u >> 4) & 0x0F0F0F0Fu) | spread_fifth_bits((qh >> (16 + 4 * w)) & 15u);
            s.q[w] = T == 6 ? bytes_minus(lo, 16) : (int)lo;
            s.q[w + 4] = T == 6 ? bytes_minus(hi, 16) : (int)hi;
        }
    } else if (T == 8) {  // Q8_0: d, 32 signed bytes
        const unsigned char* b = row + 34 * j;
        s.d0 = s.d1 = ld_f16(b);
#pragma unroll
        for (int w = 0; w < 8; w++) s.q[w] = (int)ld_u16x2(b + 2 + 4 * w);
    } else if (T == 12 || T == 13) {  // Q4_K / Q5_K: d, dmin, scales; sub-block k of 8
        const int size = T == 12 ? 144 : 176, qs_at = T == 12 ? 16 : 48;
        const unsigned char* b = row + size * (j >> 3);
        int k = j & 7, sc, mn;
        scale_min_k4(b + 4, k, &sc, &mn);
        s.d0 = s.d1 = ld_f16(b) * (float)sc;
        s.m = -ld_f16(b + 2) * (float)mn;
        // Sub-blocks 2c and 2c + 1 share 32 bytes: low nibbles, then high.
        const uint4* qs = (const uint4*)(b + qs_at + 32 * (k >> 1));
        uint4 a = qs[0], c = qs[1];
        unsigned int u[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
        const int shift = 4 * (k & 1);
#pragma unroll
        for (int w = 0; w < 8; w++) {
            unsigned int v = (u[w] >> shift) & 0x0F0F0F0Fu;
            if (T == 13) v |= ((ld_u32(b + 16 + 4 * w) >> k) & 0x01010101u) << 4;
            s.q[w] = (int)v;
        }
    } else if (T == 14) {  // Q6_K: 128 bytes of low nibbles, 64 of 2-bit pairs, 16 scales, d
        const unsigned char* b = row + 210 * (j >> 3);
        int half = (j & 7) >> 2, k = j & 3;
        const unsigned char* ql = b + 64 * half + 32 * (k & 1);
        const unsigned char* qh = b + 128 + 32 * half;
        const signed char* sc = (const signed char*)(b + 192 + 8 * half + 2 * k);
        float d = ld_f16(b + 208);
        s.d0 = d * (float)sc[0];
        s.d1 = d * (float)sc[1];
#pragma unroll
        for (int w = 0; w < 8; w++) {
            unsigned int lo = (ld_u16x2(ql + 4 * w) >> (4 * (k >> 1))) & 0x0F0F0F0Fu;
            unsigned int hi = ((ld_u16x2(qh + 4 * w) >> (2 * k)) & 0x03030303u) << 4;
            s.q[w] = bytes_minus(lo | hi, 32);
        }
    }
    return s;
}

// Sub-blocks 2c and 2c + 1 of a Q4_K / Q5_K super-block (pair p = 4 * super-block + c): they
// share their 32 bytes of nibbles (low, then high) and their super-block's scales; the same
// values as load_sub(2p) and load_sub(2p + 1), read once (quant.cu's one-row GEMV).
template <int T>
__device__ __forceinline__ void load_pair(const unsigned char* row, int p, Sub32& lo, Sub32& hi) {
    const int size = T == 12 ? 144 : 176, qs_at = T == 12 ? 16 : 48;
    const unsigned char* b = row + size * (p >> 2);
    int k = 2 * (p & 3), sc0, mn0, sc1, mn1;
    scale_min_k4(b + 4, k, &sc0, &mn0);
    scale_min_k4(b + 4, k + 1, &sc1, &mn1);
    float d = ld_f16(b), dmin = ld_f16(b + 2);
    lo.d0 = lo.d1 = d * (float)sc0;
    hi.d0 = hi.d1 = d * (float)sc1;
    lo.m = -dmin * (float)mn0;
    hi.m = -dmin * (float)mn1;
    const uint4* qs = (const uint4*)(b + qs_at + 16 * k);
    uint4 a = qs[0], c = qs[1];
    unsigned int u[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
#pragma unroll
    for (int w = 0; w < 8; w++) {
        unsigned int l = u[w] & 0x0F0F0F0Fu, h = (u[w] >> 4) & 0x0F0F0F0Fu;
        if (T == 13) {
            unsigned int qh = ld_u32(b + 16 + 4 * w);
            l |= ((qh >> k) & 0x01010101u) << 4;
            h |= ((qh >> (k + 1)) & 0x01010101u) << 4;
        }
        lo.q[w] = (int)l;
        hi.q[w] = (int)h;
    }
}

// Bytes of a row of `cols` values.
template <int T>
__device__ __forceinline__ long row_bytes(int cols) {
    switch (T) {
        case 2: return (long)(cols / 32) * 18;
        case 3: return (long)(cols / 32) * 20;
        case 6: return (long)(cols / 32) * 22;
        case 7: return (long)(cols / 32) * 24;
        case 8: return (long)(cols / 32) * 34;
        case 12: return (long)(cols / 256) * 144;
        case 13: return (long)(cols / 256) * 176;
        default: return (long)(cols / 256) * 210;
    }
}

// Value i (0..31) of a sub-block.
__device__ __forceinline__ float sub_value(const Sub32& s, int i) {
    float d = i < 16 ? s.d0 : s.d1;
    return d * (float)(signed char)((unsigned int)s.q[i >> 2] >> (8 * (i & 3))) + s.m;
}

// A sub-block's dot with its 32 quantised activations.
__device__ __forceinline__ float sub_dot(const Sub32& s, const Q8Act& a) {
    int s0 = 0, s1 = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) s0 = dp4a(s.q[k], a.qs[k], s0);
#pragma unroll
    for (int k = 4; k < 8; k++) s1 = dp4a(s.q[k], a.qs[k], s1);
    return a.d * (s.d0 * (float)s0 + s.d1 * (float)s1) + s.m * a.sum;
}
