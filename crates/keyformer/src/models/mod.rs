//! Model architectures, one file each, and the loader that picks one from a GGUF file.

pub mod llama;
pub mod random;

use std::path::Path;
use std::sync::Arc;

use crate::gguf::GgufFile;
use crate::ModelError;

/// Values of `general.architecture` that load with the Llama file.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// Open a GGUF file and build its model.
pub fn load(path: &Path) -> Result<(Arc<GgufFile>, llama::Llama), ModelError> {
    let file = Arc::new(GgufFile::open(path)?);
    let arch = file.get_str("general.architecture")?.to_string();
    if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(ModelError::UnsupportedArchitecture(arch));
    }
    let model = llama::Llama::load(file.clone(), &arch)?;
    Ok((file, model))
}
