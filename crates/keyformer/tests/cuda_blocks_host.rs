//! The GPU's quantised-block decoding (`src/backend/cuda/quant_blocks.cuh`, the code the CUDA
//! GEMV, dequantiser and embedding kernels run) compiled for the host with the system's C++
//! compiler (`$CXX`, else `c++`) and checked against the CPU: every value of every type equal
//! to `quant::dequantize_row`'s, and each row's dot with Q8 activations equal to
//! `quant::dot::dot_q8_scalar`'s up to the order of the float sums, and the one-row GEMV's
//! Q4_K / Q5_K pair reader equal to two sub-block reads. No GPU needed, so CI runs it.

use std::path::PathBuf;
use std::process::Command;

use keyformer::models::random::{mix64, quantised_blocks, QUANTISED_TYPES};
use keyformer::quant::dot::{dot_q8_scalar, quantize_q8_scalar, Q8Block};
use keyformer::quant::{dequantize_row, GgmlType};

const HEADER: &str = include_str!("../src/backend/cuda/quant_blocks.cuh");
const HARNESS: &str = include_str!("cuda_host/blocks_harness.cpp");

fn build_harness(dir: &std::path::Path) -> PathBuf {
    std::fs::write(dir.join("quant_blocks.cuh"), HEADER).unwrap();
    std::fs::write(dir.join("blocks_harness.cpp"), HARNESS).unwrap();
    let exe = dir.join("blocks_harness");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args(["-O2", "-std=c++17", "-Wall", "-Wno-unknown-pragmas", "-o"])
        .arg(&exe)
        .arg(dir.join("blocks_harness.cpp"))
        .output()
        .unwrap_or_else(|e| panic!("no C++ compiler '{cxx}' to build the block harness ({e}); set CXX"));
    assert!(out.status.success(), "harness did not compile:\n{}", String::from_utf8_lossy(&out.stderr));
    exe
}

/// Blocks with every bit random but the f16 scales (kept finite and of a sane size by
/// `quantised_blocks`): the K-quants' packed 6-bit scales and Q6_K's signed ones too.
fn blocks(t: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut b = quantised_blocks(t, rows, cols, seed, 1, 0.1);
    let scale_bytes = match t {
        GgmlType::Q4K | GgmlType::Q5K => 4..16,
        GgmlType::Q6K => 192..208,
        _ => 0..0,
    };
    for (i, block) in b.chunks_exact_mut(t.block_bytes()).enumerate() {
        for k in scale_bytes.clone() {
            block[k] = mix64(seed ^ (i as u64) << 8 ^ k as u64) as u8;
        }
    }
    b
}

#[test]
fn gpu_block_decoding_equals_the_cpu_dequantiser_and_integer_dots() {
    let dir = std::env::temp_dir().join(format!("keyformer-cuda-host-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = build_harness(&dir);
    let (rows, cols) = (6usize, 1024usize);
    for (k, t) in QUANTISED_TYPES.into_iter().enumerate() {
        let w = blocks(t, rows, cols, 40 + k as u64);
        let rb = t.row_bytes(cols);
        let x: Vec<f32> =
            (0..cols).map(|i| ((mix64(i as u64 ^ 0xA5) >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0).collect();
        let mut act: Vec<Q8Block> = Vec::new();
        quantize_q8_scalar(&x, &mut act);
        let mut input = w.clone();
        for a in &act {
            input.extend_from_slice(&a.d.to_le_bytes());
            input.extend_from_slice(&a.sum.to_le_bytes());
            input.extend(a.qs.iter().map(|q| *q as u8));
        }
        let (inp, outp) = (dir.join(format!("in-{t}")), dir.join(format!("out-{t}")));
        std::fs::write(&inp, &input).unwrap();
        let status = Command::new(&exe)
            .arg(t.id().to_string())
            .arg(rows.to_string())
            .arg(cols.to_string())
            .arg(&inp)
            .arg(&outp)
            .status()
            .unwrap();
        // Exit code 5: load_pair (Q4_K / Q5_K) disagrees with load_sub.
        assert!(status.success(), "{t}: harness exited with {status}");
        let out: Vec<f32> = std::fs::read(&outp)
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(out.len(), rows * cols + rows, "{t}");
        for r in 0..rows {
            let row = &w[r * rb..(r + 1) * rb];
            let mut want = vec![0f32; cols];
            dequantize_row(t, row, &mut want);
            let got = &out[r * cols..(r + 1) * cols];
            // The same float operations in the same order (no FMA on the host): equal values
            // (a zero's sign aside: the GPU adds Q6_K's zero offset to -0.0).
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(
                differ,
                0,
                "{t} row {r}: {differ} values differ, first {:?}",
                got.iter().zip(&want).find(|(a, b)| a != b)
            );
            let dot = out[rows * cols + r];
            let want_dot = dot_q8_scalar(t, row, &act);
            let magnitude: f32 = want.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
            assert!(
                (dot - want_dot).abs() <= 1e-5 * magnitude,
                "{t} row {r}: dot {dot} against the CPU's {want_dot} (sum |w x| {magnitude})"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
