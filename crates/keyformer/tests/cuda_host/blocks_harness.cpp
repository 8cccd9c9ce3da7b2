// Host harness for the GPU's block decoding (src/backend/cuda/quant_blocks.cuh), compiled by
// tests/cuda_blocks_host.rs with the system's C++ compiler: the header's two device helpers
// get plain C++ definitions, then every sub-block of a weight is decoded and dotted exactly as
// the kernels of quant.cu do.
//
//     blocks_harness TYPE ROWS COLS IN OUT
//
// IN: the weight's blocks, then COLS / 32 activation blocks (quant::dot::Q8Block, 40 bytes).
// OUT: ROWS x COLS f32 values (sub_value), then ROWS f32 dots with the activations (sub_dot,
// summed over the row's sub-blocks in order). Exit 5: a Q4_K / Q5_K pair read by load_pair
// differs from its two sub-blocks read by load_sub.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __device__
#define __forceinline__ inline

struct uint4 {
    unsigned int x, y, z, w;
};

static float h2f(unsigned short h) {
    unsigned sign = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    float v = e == 0 ? std::ldexp((float)m, -24)
              : e == 31 ? (m ? NAN : INFINITY)
                        : std::ldexp((float)(m | 1024), (int)e - 25);
    return sign ? -v : v;
}

static int dp4a(int a, int b, int c) {
    for (int k = 0; k < 4; k++) c += (signed char)(a >> (8 * k)) * (signed char)(b >> (8 * k));
    return c;
}

#include "quant_blocks.cuh"

// Two decoded sub-blocks with the same bits (quants, scales, offset).
static bool same_sub(const Sub32& a, const Sub32& b) {
    for (int w = 0; w < 8; w++)
        if (a.q[w] != b.q[w]) return false;
    return std::memcmp(&a.d0, &b.d0, 4) == 0 && std::memcmp(&a.d1, &b.d1, 4) == 0 && std::memcmp(&a.m, &b.m, 4) == 0;
}

template <int T>
static int run(int rows, int cols, const std::vector<unsigned char>& in, FILE* out) {
    long rb = row_bytes<T>(cols), nsub = cols / 32;
    if ((long)in.size() != rows * rb + nsub * (long)sizeof(Q8Act)) return 3;
    const Q8Act* act = (const Q8Act*)(in.data() + rows * rb);
    std::vector<float> values((size_t)rows * cols), dots(rows);
    for (int r = 0; r < rows; r++) {
        float acc = 0.0f;
        for (int j = 0; j < nsub; j++) {
            Sub32 s = load_sub<T>(in.data() + r * rb, j);
            for (int i = 0; i < 32; i++) values[(size_t)r * cols + 32 * j + i] = sub_value(s, i);
            acc += sub_dot(s, act[j]);
        }
        dots[r] = acc;
    }
    fwrite(values.data(), 4, values.size(), out);
    fwrite(dots.data(), 4, dots.size(), out);
    // Q4_K / Q5_K: the one-row GEMV's pair reader gives each pair's two sub-blocks exactly.
    if (T == 12 || T == 13)
        for (int r = 0; r < rows; r++)
            for (int p = 0; p < cols / 64; p++) {
                Sub32 lo, hi;
                load_pair<T>(in.data() + r * rb, p, lo, hi);
                if (!same_sub(lo, load_sub<T>(in.data() + r * rb, 2 * p)) ||
                    !same_sub(hi, load_sub<T>(in.data() + r * rb, 2 * p + 1)))
                    return 5;
            }
    return 0;
}

int main(int argc, char** argv) {
    if (argc != 6) return 2;
    int type = atoi(argv[1]), rows = atoi(argv[2]), cols = atoi(argv[3]);
    FILE* f = fopen(argv[4], "rb");
    if (!f) return 2;
    std::vector<unsigned char> in;
    int c;
    while ((c = fgetc(f)) != EOF) in.push_back((unsigned char)c);
    fclose(f);
    FILE* out = fopen(argv[5], "wb");
    if (!out) return 2;
    int rc;
    switch (type) {
        case 2: rc = run<2>(rows, cols, in, out); break;
        case 3: rc = run<3>(rows, cols, in, out); break;
        case 6: rc = run<6>(rows, cols, in, out); break;
        case 7: rc = run<7>(rows, cols, in, out); break;
        case 8: rc = run<8>(rows, cols, in, out); break;
        case 12: rc = run<12>(rows, cols, in, out); break;
        case 13: rc = run<13>(rows, cols, in, out); break;
        case 14: rc = run<14>(rows, cols, in, out); break;
        default: rc = 4;
    }
    fclose(out);
    return rc;
}
