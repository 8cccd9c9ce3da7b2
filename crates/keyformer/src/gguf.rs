//! GGUF reader (format versions 2 and 3) over a memory map.
//!
//! Layout (ggml's `docs/gguf.md`): magic `GGUF`, version, tensor count, metadata count, the
//! metadata key/values, the tensor infos, padding to `general.alignment` (default 32), then the
//! tensor data. Every length read from the file is checked against the bytes that remain, so a
//! truncated or corrupt file is an error and never a huge allocation or a panic.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::quant::GgmlType;

/// Errors from reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("not a GGUF file: it begins with {} where a GGUF file begins with \"GGUF\"", show_magic(.0))]
    BadMagic([u8; 4]),
    #[error("tensor {} is listed twice", shown(.0))]
    DuplicateTensor(String),
    #[error("tensors {} and {} overlap in the file", shown(.first), shown(.second))]
    OverlappingTensors { first: String, second: String },
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("file is truncated: needed {needed} bytes at offset {offset}, file has {len}")]
    Truncated { offset: usize, needed: usize, len: usize },
    #[error("unknown metadata value type {0}")]
    UnknownValueType(u32),
    #[error("metadata string is not UTF-8 at offset {0}")]
    BadString(usize),
    #[error("tensor {} has unknown type id {type_id}", shown(.name))]
    UnknownTensorType { name: String, type_id: u32 },
    #[error("tensor {}: {reason}", shown(.name))]
    BadTensor { name: String, reason: String },
    #[error("tensor {} data [{start}, {end}) lies past the end of the file ({len} bytes)", shown(.name))]
    TensorOutOfBounds { name: String, start: usize, end: usize, len: usize },
    #[error("missing metadata key '{0}'")]
    MissingKey(String),
    #[error("metadata key '{key}' has the wrong type: expected {expected}")]
    WrongType { key: String, expected: &'static str },
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("cannot hold the {bytes} bytes of {path}'s weights in memory ({source}); --mmap maps the file instead")]
    Resident { path: PathBuf, bytes: usize, source: std::io::Error },
    #[error("{}: the weights have no tensor '{folder_name}' (read as {name})", .path.display())]
    MissingFolderTensor { path: PathBuf, folder_name: String, name: String },
}

/// A name read from a file, quoted for a one-line message: control characters escaped, and
/// cut after 80 characters.
fn shown(name: &str) -> String {
    let escaped = crate::one_line(&name.chars().take(80).collect::<String>());
    let more = if name.chars().count() > 80 { "..." } else { "" };
    format!("'{escaped}{more}'")
}

/// The first bytes of a file that is not GGUF, as text where they are printable.
fn show_magic(m: &[u8; 4]) -> String {
    if m.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("\"{}\"", String::from_utf8_lossy(m))
    } else {
        format!("bytes {m:02x?}")
    }
}

/// A metadata value of any of GGUF's value types.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// Any integer type as i64 (u64 values above i64::MAX are not integers for us).
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            MetaValue::U8(v) => v as i64,
            MetaValue::I8(v) => v as i64,
            MetaValue::U16(v) => v as i64,
            MetaValue::I16(v) => v as i64,
            MetaValue::U32(v) => v as i64,
            MetaValue::I32(v) => v as i64,
            MetaValue::U64(v) => i64::try_from(v).ok()?,
            MetaValue::I64(v) => v,
            _ => return None,
        })
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
    /// A short human-readable rendering (arrays are summarised).
    pub fn summary(&self) -> String {
        match self {
            MetaValue::String(s) if s.len() > 60 => format!("{:?}...", &s[..s.floor_char_boundary(60)]),
            MetaValue::String(s) => format!("{s:?}"),
            MetaValue::Array(a) => format!("[{} values]", a.len()),
            MetaValue::Bool(b) => b.to_string(),
            MetaValue::F32(v) => v.to_string(),
            MetaValue::F64(v) => v.to_string(),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

/// Where a tensor lives in the file and what it holds.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in its mapping.
    pub offset: usize,
    pub size_bytes: usize,
    /// Which of the model's mappings holds the data (0 for a GGUF file; a Hugging Face folder
    /// has one per safetensors shard, and one for the tensors converted at load).
    pub source: usize,
    /// The tensor's name where it came from, when that is not this name (a folder's
    /// `model.layers.0.self_attn.q_proj.weight` in `model.safetensors` for `blk.0.attn_q.weight`).
    pub origin: Option<String>,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
}

/// How a model's tensor data is held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadMode {
    /// Read into the process's own memory, advised for transparent huge pages (Linux). A decode
    /// step streams every weight once: with 2 MiB pages instead of the page cache's 4 KiB ones it
    /// misses the TLB 512x less often, and Qwen2.5-0.5B's CPU decode measured 9-10% faster.
    #[default]
    Resident,
    /// Mapped from the file: starts fastest, pages are shared with other processes reading the
    /// same file, and a model larger than memory still runs (slowly). llama.cpp's default.
    Mmap,
}

/// An opened GGUF file: parsed header and a memory map of the whole file. A Hugging Face
/// folder is read into the same shape ([`crate::hf`]: metadata keys and tensor names as
/// llama.cpp's converter would write them, the data left in the safetensors maps), so one
/// model description serves both formats.
pub struct GgufFile {
    pub path: PathBuf,
    /// The GGUF version; 0 for a model assembled from another format.
    pub version: u32,
    pub alignment: usize,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    sources: Vec<Mmap>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile").field("path", &self.path).field("version", &self.version).finish()
    }
}

const MAGIC: [u8; 4] = *b"GGUF";

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(GgufError::Truncated {
            offset: self.pos,
            needed: n,
            len: self.buf.len(),
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A count that must fit in the remaining bytes, `min_bytes_each` per item.
    fn count(&mut self, min_bytes_each: usize) -> Result<usize, GgufError> {
        let at = self.pos;
        let n = self.u64()?;
        let remaining = self.buf.len() - self.pos;
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(min_bytes_each.max(1)) <= remaining => Ok(n),
            _ => {
                Err(GgufError::Truncated { offset: at, needed: n.min(usize::MAX as u64) as usize, len: self.buf.len() })
            }
        }
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let at = self.pos;
        let n = self.count(1)?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::BadString(at))
    }
    fn value(&mut self, type_id: u32) -> Result<MetaValue, GgufError> {
        Ok(match type_id {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(self.array::<1>()?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => MetaValue::Bool(self.array::<1>()?[0] != 0),
            8 => MetaValue::String(self.string()?),
            9 => {
                let elem_type = self.u32()?;
                let min_each = match elem_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4 | 5 | 6 => 4,
                    8 | 10 | 11 | 12 => 8,
                    9 => 12,
                    t => return Err(GgufError::UnknownValueType(t)),
                };
                let n = self.count(min_each)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_type)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            t => return Err(GgufError::UnknownValueType(t)),
        })
    }
}

impl GgufFile {
    /// Open and validate a GGUF file. Tensor data is not read until used.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| GgufError::Open { path: path.clone(), source })?;
        // SAFETY: the map is read-only; a file changed underneath us by another process is
        // outside what any mmap-based reader (llama.cpp included) can guard against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| GgufError::Open { path: path.clone(), source })?;
        let (version, alignment, metadata, tensors) = Self::parse(&mmap)?;
        Ok(Self { path, version, alignment, metadata, tensors, sources: vec![mmap] })
    }

    /// Hold the tensor data as `mode` says: [`LoadMode::Resident`] copies every mapping into
    /// anonymous memory (advised for huge pages), releasing the file's pages chunk by chunk so
    /// the process never holds both copies; [`LoadMode::Mmap`] leaves the mappings as they are.
    pub fn hold(&mut self, mode: LoadMode) -> Result<(), GgufError> {
        match mode {
            LoadMode::Mmap => Ok(()),
            // 64 MiB copied between releases of the file's pages.
            LoadMode::Resident => self.copy_to_memory(64 << 20),
        }
    }

    fn copy_to_memory(&mut self, chunk: usize) -> Result<(), GgufError> {
        for source in &mut self.sources {
            let len = source.len();
            if len == 0 {
                continue;
            }
            let error = |source| GgufError::Resident { path: self.path.clone(), bytes: len, source };
            let mut anon = memmap2::MmapMut::map_anon(len).map_err(error)?;
            // Only a hint: a kernel without transparent huge pages keeps 4 KiB ones.
            #[cfg(target_os = "linux")]
            let _ = anon.advise(memmap2::Advice::HugePage);
            for start in (0..len).step_by(chunk) {
                let end = (start + chunk).min(len);
                anon[start..end].copy_from_slice(&source[start..end]);
                // SAFETY: the mapping is read-only and file-backed: dropping its pages only
                // makes a later read fetch them from the file again, and none will come.
                #[cfg(unix)]
                let _ =
                    unsafe { source.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
            }
            *source = anon.make_read_only().map_err(error)?;
        }
        Ok(())
    }

    /// A model assembled from another format: metadata in GGUF's keys, tensors whose data lie
    /// in `sources` (each checked to lie inside its mapping).
    pub fn assembled(
        path: PathBuf,
        metadata: BTreeMap<String, MetaValue>,
        tensors: Vec<TensorInfo>,
        sources: Vec<Mmap>,
    ) -> Result<Self, GgufError> {
        for t in &tensors {
            let len = sources.get(t.source).map_or(0, |m| m.len());
            let end = t.offset.checked_add(t.size_bytes).unwrap_or(usize::MAX);
            if end > len {
                return Err(GgufError::TensorOutOfBounds { name: t.name.clone(), start: t.offset, end, len });
            }
        }
        Ok(Self { path, version: 0, alignment: 1, metadata, tensors, sources })
    }

    /// A GGUF file held in memory (the fuzzer's cases), validated as [`open`](Self::open)
    /// validates a file; `label` stands for its path in messages.
    pub fn from_bytes(label: impl Into<PathBuf>, bytes: &[u8]) -> Result<Self, GgufError> {
        let path = label.into();
        let (version, alignment, metadata, tensors) = Self::parse(bytes)?;
        let open_error = |source| GgufError::Open { path: path.clone(), source };
        let mut anon = memmap2::MmapMut::map_anon(bytes.len()).map_err(open_error)?;
        anon.copy_from_slice(bytes);
        let mmap = anon.make_read_only().map_err(open_error)?;
        Ok(Self { path, version, alignment, metadata, tensors, sources: vec![mmap] })
    }

    #[allow(clippy::type_complexity)]
    fn parse(buf: &[u8]) -> Result<(u32, usize, BTreeMap<String, MetaValue>, Vec<TensorInfo>), GgufError> {
        let mut c = Cursor { buf, pos: 0 };
        let magic: [u8; 4] = c.array().map_err(|_| GgufError::BadMagic([0; 4]))?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = c.count(24)?;
        let n_kv = c.count(12)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let t = c.u32()?;
            let v = c.value(t)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_i64() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() => a as usize,
                _ => {
                    return Err(GgufError::BadTensor {
                        name: "general.alignment".into(),
                        reason: format!("alignment {} is not a power of two", v.summary()),
                    })
                }
            },
        };
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(GgufError::BadTensor { name, reason: format!("{n_dims} dimensions (1..=4 supported)") });
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = c.u64()?;
                dims.push(usize::try_from(d).map_err(|_| GgufError::BadTensor {
                    name: name.clone(),
                    reason: format!("dimension {d} too large"),
                })?);
            }
            let type_id = c.u32()?;
            let offset = c.u64()?;
            raw.push((name, dims, type_id, offset));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, type_id, offset) in raw {
            let ggml_type = GgmlType::from_id(type_id)
                .ok_or_else(|| GgufError::UnknownTensorType { name: name.clone(), type_id })?;
            let n_el = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let block = ggml_type.block_size();
            let size_bytes = match n_el {
                Some(n) if dims[0] % block == 0 => (n / block).checked_mul(ggml_type.block_bytes()),
                Some(_) => {
                    return Err(GgufError::BadTensor {
                        name,
                        reason: format!("row length {} is not a multiple of the {ggml_type} block ({block})", dims[0]),
                    })
                }
                None => None,
            };
            let size_bytes = size_bytes
                .ok_or_else(|| GgufError::BadTensor { name: name.clone(), reason: "size overflows".into() })?;
            if offset % alignment as u64 != 0 {
                return Err(GgufError::BadTensor {
                    name,
                    reason: format!("offset {offset} is not aligned to {alignment}"),
                });
            }
            let start = usize::try_from(offset).ok().and_then(|o| o.checked_add(data_start));
            let end = start.and_then(|s| s.checked_add(size_bytes));
            match (start, end) {
                (Some(start), Some(end)) if end <= buf.len() => tensors.push(TensorInfo {
                    name,
                    dims,
                    ggml_type,
                    offset: start,
                    size_bytes,
                    source: 0,
                    origin: None,
                }),
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        name,
                        start: start.unwrap_or(usize::MAX),
                        end: end.unwrap_or(usize::MAX),
                        len: buf.len(),
                    })
                }
            }
        }
        // Each tensor once, and no two sharing bytes (a crafted file could alias weights).
        let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
        by_offset.sort_by(|a, b| (a.offset, &a.name).cmp(&(b.offset, &b.name)));
        for pair in by_offset.windows(2) {
            if pair[0].name == pair[1].name {
                return Err(GgufError::DuplicateTensor(pair[0].name.clone()));
            }
            if pair[0].offset + pair[0].size_bytes > pair[1].offset && pair[0].size_bytes > 0 {
                return Err(GgufError::OverlappingTensors {
                    first: pair[0].name.clone(),
                    second: pair[1].name.clone(),
                });
            }
        }
        let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|p| p[0] == p[1]) {
            return Err(GgufError::DuplicateTensor(pair[0].to_string()));
        }
        Ok((version, alignment, metadata, tensors))
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }
    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.require(key)?.as_str().ok_or(GgufError::WrongType { key: key.into(), expected: "string" })
    }
    pub fn get_usize(&self, key: &str) -> Result<usize, GgufError> {
        self.require(key)?
            .as_i64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or(GgufError::WrongType { key: key.into(), expected: "non-negative integer" })
    }
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.require(key)?
            .as_f64()
            .map(|v| v as f32)
            .ok_or(GgufError::WrongType { key: key.into(), expected: "number" })
    }
    pub fn get_array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        self.require(key)?.as_array().ok_or(GgufError::WrongType { key: key.into(), expected: "array" })
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
    /// The raw bytes of a tensor (validated to lie inside its mapping at open time).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.sources[info.source][info.offset..info.offset + info.size_bytes]
    }
    /// Bytes mapped: the file, or a folder's shards and converted tensors.
    pub fn file_len(&self) -> usize {
        self.sources.iter().map(|m| m.len()).sum()
    }
    /// The error for a tensor the model needs and does not have, in the folder's names when
    /// it came from one.
    pub fn missing_tensor(&self, name: &str) -> GgufError {
        let arch = self.get("general.architecture").and_then(MetaValue::as_str).unwrap_or("");
        match crate::hf::folder_name(arch, name).filter(|_| self.version == 0) {
            Some(folder_name) => {
                GgufError::MissingFolderTensor { path: self.path.clone(), folder_name, name: name.into() }
            }
            None => GgufError::MissingTensor(name.into()),
        }
    }

    /// A tensor's name for a message: quoted, with the name it has in its own file when that
    /// differs.
    pub fn describe(&self, name: &str) -> String {
        match self.tensor_info(name).and_then(|t| t.origin.as_deref()) {
            Some(origin) => format!("{} ({})", shown(origin), shown(name)),
            None => shown(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a minimal GGUF v3 image in memory (the test is its own independent writer).
    pub(crate) fn tiny_gguf(tensor_type: u32, data_len: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // tensors
        b.extend_from_slice(&2u64.to_le_bytes()); // kv
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u64).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        s(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "test.array");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&5u32.to_le_bytes());
        b.extend_from_slice(&3u64.to_le_bytes());
        for v in [-1i32, 2, 3] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        s(&mut b, "w");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&32u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&tensor_type.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend(std::iter::repeat_n(0u8, data_len));
        b
    }

    fn parse(b: &[u8]) -> Result<(u32, usize, BTreeMap<String, MetaValue>, Vec<TensorInfo>), GgufError> {
        GgufFile::parse(b)
    }

    #[test]
    fn weights_read_into_memory_equal_the_mapped_file() {
        let mut b = tiny_gguf(0, 256);
        let data_start = b.len() - 256;
        for (i, v) in b[data_start..].iter_mut().enumerate() {
            *v = (i * 7 + 3) as u8;
        }
        let path = std::env::temp_dir().join(format!("keyformer-hold-{}.gguf", std::process::id()));
        std::fs::write(&path, &b).unwrap();
        let mapped = GgufFile::open(&path).unwrap();
        // Chunks that do not divide the file, so the last one is short.
        for chunk in [100, 4096, 1 << 20] {
            let mut held = GgufFile::open(&path).unwrap();
            held.copy_to_memory(chunk).unwrap();
            assert_eq!(held.file_len(), b.len());
            let t = &held.tensors[0];
            assert_eq!(held.tensor_bytes(t), &b[data_start..], "chunk {chunk}");
            assert_eq!(held.tensor_bytes(t), mapped.tensor_bytes(&mapped.tensors[0]));
        }
        let mut held = GgufFile::open(&path).unwrap();
        held.hold(LoadMode::Resident).unwrap();
        assert_eq!(held.tensor_bytes(&held.tensors[0]), &b[data_start..]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn parses_metadata_and_tensors() {
        let b = tiny_gguf(0, 256);
        let (v, align, md, t) = parse(&b).unwrap();
        assert_eq!((v, align), (3, 32));
        assert_eq!(md["general.architecture"].as_str(), Some("llama"));
        let arr: Vec<i64> = md["test.array"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        assert_eq!(arr, vec![-1, 2, 3]);
        assert_eq!(t[0].dims, vec![32, 2]);
        assert_eq!(t[0].size_bytes, 256);
    }

    #[test]
    fn reads_every_value_type_in_v2_and_v3() {
        for version in [2u32, 3] {
            let mut b = b"GGUF".to_vec();
            b.extend_from_slice(&version.to_le_bytes());
            b.extend_from_slice(&0u64.to_le_bytes());
            b.extend_from_slice(&13u64.to_le_bytes());
            let key = |b: &mut Vec<u8>, k: &str, t: u32| {
                b.extend_from_slice(&(k.len() as u64).to_le_bytes());
                b.extend_from_slice(k.as_bytes());
                b.extend_from_slice(&t.to_le_bytes());
            };
            key(&mut b, "u8", 0);
            b.push(200);
            key(&mut b, "i8", 1);
            b.push(-5i8 as u8);
            key(&mut b, "u16", 2);
            b.extend_from_slice(&60000u16.to_le_bytes());
            key(&mut b, "i16", 3);
            b.extend_from_slice(&(-300i16).to_le_bytes());
            key(&mut b, "u32", 4);
            b.extend_from_slice(&4_000_000_000u32.to_le_bytes());
            key(&mut b, "i32", 5);
            b.extend_from_slice(&(-70000i32).to_le_bytes());
            key(&mut b, "f32", 6);
            b.extend_from_slice(&1.5f32.to_le_bytes());
            key(&mut b, "bool", 7);
            b.push(1);
            key(&mut b, "str", 8);
            b.extend_from_slice(&5u64.to_le_bytes());
            b.extend_from_slice("héé".as_bytes());
            key(&mut b, "arr", 9);
            b.extend_from_slice(&8u32.to_le_bytes());
            b.extend_from_slice(&2u64.to_le_bytes());
            for s in ["a", "bc"] {
                b.extend_from_slice(&(s.len() as u64).to_le_bytes());
                b.extend_from_slice(s.as_bytes());
            }
            key(&mut b, "u64", 10);
            b.extend_from_slice(&u64::MAX.to_le_bytes());
            key(&mut b, "i64", 11);
            b.extend_from_slice(&i64::MIN.to_le_bytes());
            key(&mut b, "f64", 12);
            b.extend_from_slice(&(-2.25f64).to_le_bytes());
            let (v, _, md, t) = parse(&b).unwrap();
            assert_eq!(v, version);
            assert!(t.is_empty());
            assert_eq!(md["u8"], MetaValue::U8(200));
            assert_eq!(md["i8"], MetaValue::I8(-5));
            assert_eq!(md["u16"], MetaValue::U16(60000));
            assert_eq!(md["i16"], MetaValue::I16(-300));
            assert_eq!(md["u32"], MetaValue::U32(4_000_000_000));
            assert_eq!(md["i32"], MetaValue::I32(-70000));
            assert_eq!(md["f32"], MetaValue::F32(1.5));
            assert_eq!(md["bool"], MetaValue::Bool(true));
            assert_eq!(md["str"].as_str(), Some("héé"));
            assert_eq!(
                md["arr"],
                MetaValue::Array(vec![MetaValue::String("a".into()), MetaValue::String("bc".into())])
            );
            assert_eq!(md["u64"], MetaValue::U64(u64::MAX));
            assert_eq!(md["u64"].as_i64(), None, "u64 above i64::MAX is not silently wrapped");
            assert_eq!(md["i64"], MetaValue::I64(i64::MIN));
            assert_eq!(md["f64"], MetaValue::F64(-2.25));
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let b = tiny_gguf(0, 256);
        for cut in 0..b.len() {
            assert!(parse(&b[..cut]).is_err(), "truncated at {cut} parsed");
        }
    }

    #[test]
    fn rejects_bad_magic_version_type_and_offset() {
        let mut b = tiny_gguf(0, 256);
        b[0] = b'X';
        assert!(matches!(parse(&b), Err(GgufError::BadMagic(_))));
        let mut b = tiny_gguf(0, 256);
        b[4] = 9;
        assert!(matches!(parse(&b), Err(GgufError::UnsupportedVersion(9))));
        let b = tiny_gguf(99, 256);
        assert!(matches!(parse(&b), Err(GgufError::UnknownTensorType { type_id: 99, .. })));
        let b = tiny_gguf(0, 100);
        assert!(matches!(parse(&b), Err(GgufError::TensorOutOfBounds { .. })));
    }
}
