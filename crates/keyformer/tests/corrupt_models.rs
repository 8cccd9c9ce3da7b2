//! Corrupt model files found by probing (issue 17): each is refused with one clear error,
//! before anything is sized by the corrupt number. The files are a valid tiny random model
//! (`random::write_gguf`) with one field patched in place.

use keyformer::gguf::GgufFile;
use keyformer::models::random::{write_gguf, RandomShape};
use keyformer::ModelError;

/// Tests run in parallel threads: each call writes its own file, so no test reads another's
/// half-written one.
fn tiny_bytes() -> Vec<u8> {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("keyformer-corrupt-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    write_gguf(&path, &RandomShape::by_name("tiny").unwrap(), 1).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    bytes
}

/// Where the value of metadata key `key` starts (after its name and its 4-byte type).
fn value_at(b: &[u8], key: &str) -> usize {
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    b.windows(needle.len()).position(|w| w == needle).unwrap_or_else(|| panic!("no key {key}")) + needle.len() + 4
}

/// Where tensor `name`'s info entry starts (its name's length prefix).
fn tensor_at(b: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    b.windows(needle.len()).position(|w| w == needle).unwrap_or_else(|| panic!("no tensor {name}"))
}

/// The byte offset of tensor `name`'s `offset` field (1-D or 2-D tensors).
fn offset_field(b: &[u8], name: &str) -> usize {
    let at = tensor_at(b, name) + 8 + name.len();
    let n_dims = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    at + 4 + 8 * n_dims + 4
}

fn load(bytes: &[u8], name: &str) -> Result<(), String> {
    let path = std::env::temp_dir().join(format!("keyformer-corrupt-{}-{name}.gguf", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let r = keyformer::models::load(&path, keyformer::gguf::LoadMode::Mmap)
        .map(|_| ())
        .map_err(|e: ModelError| e.to_string());
    let _ = std::fs::remove_file(path);
    r
}

#[test]
fn the_untouched_file_loads() {
    load(&tiny_bytes(), "good").unwrap();
}

#[test]
fn corrupt_counts_and_numbers_are_refused() {
    let good = tiny_bytes();
    let patch_u32 = |key: &str, v: u32| {
        let mut b = good.clone();
        let at = value_at(&b, key);
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        b
    };
    let patch_f32 = |key: &str, v: f32| {
        let mut b = good.clone();
        let at = value_at(&b, key);
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        b
    };
    for (bytes, name, needle) in [
        (patch_u32("llama.block_count", 0), "blocks-0", "block_count is 0"),
        (patch_u32("llama.block_count", 1 << 31), "blocks-huge", "block_count is 2147483648"),
        (patch_u32("llama.block_count", 1), "blocks-fewer", "holds tensors for 2 blocks"),
        (patch_u32("llama.attention.head_count_kv", 3), "kv-heads", "cannot be grouped over 3 KV heads"),
        (patch_u32("llama.context_length", 0), "context-0", "a context length of 0"),
        (patch_u32("llama.feed_forward_length", 0), "ffn-0", "0 feed-forward"),
        (patch_f32("llama.attention.layer_norm_rms_epsilon", f32::NAN), "eps-nan", "norm epsilon NaN"),
        (patch_f32("llama.attention.layer_norm_rms_epsilon", f32::INFINITY), "eps-inf", "norm epsilon inf"),
        (patch_f32("llama.rope.freq_base", -1.0), "theta", "rope base -1"),
    ] {
        let err = load(&bytes, name).expect_err(name);
        assert!(err.contains(needle), "{name}: {err}");
    }
}

#[test]
fn duplicated_and_overlapping_tensors_are_refused() {
    let good = tiny_bytes();
    // Rename blk.1's attention norm to blk.0's: the same name listed twice.
    let mut dup = good.clone();
    let at = tensor_at(&dup, "blk.1.attn_norm.weight") + 8;
    dup[at..at + 5].copy_from_slice(b"blk.0");
    let err = load(&dup, "dup").unwrap_err();
    assert!(err.contains("listed twice"), "{err}");
    // Point one norm's data at another's: two tensors sharing bytes.
    let mut overlap = good.clone();
    let (from, to) = (offset_field(&good, "blk.0.attn_norm.weight"), offset_field(&good, "blk.0.ffn_norm.weight"));
    let target: [u8; 8] = good[to..to + 8].try_into().unwrap();
    overlap[from..from + 8].copy_from_slice(&target);
    let err = load(&overlap, "overlap").unwrap_err();
    assert!(err.contains("overlap"), "{err}");
    // The reader alone (no model) refuses them too.
    let path = std::env::temp_dir().join(format!("keyformer-corrupt-{}-reader.gguf", std::process::id()));
    std::fs::write(&path, &overlap).unwrap();
    assert!(GgufFile::open(&path).is_err());
    let _ = std::fs::remove_file(path);
}
