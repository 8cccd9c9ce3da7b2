//! Models: [`config`] describes a decoder (one [`config::Family`] row per architecture plus
//! what the file's metadata and tensors say), [`decoder`] runs any such description over the
//! backend op set, [`random`] draws random weights at real shapes.

pub mod config;
pub mod decoder;
pub mod random;

use std::path::Path;
use std::sync::Arc;

use crate::gguf::{GgufFile, LoadMode};
use crate::ModelError;

/// Open a GGUF file or a Hugging Face folder, its data held as `mode` says, and build its model.
pub fn load(path: &Path, mode: LoadMode) -> Result<(Arc<GgufFile>, decoder::Model), ModelError> {
    let mut file = match path.is_dir() {
        true => crate::hf::open(path)?.file,
        false => GgufFile::open(path)?,
    };
    file.hold(mode)?;
    let file = Arc::new(file);
    let model = load_file(file.clone())?;
    Ok((file, model))
}

/// Build the model of an open GGUF file.
pub fn load_file(file: Arc<GgufFile>) -> Result<decoder::Model, ModelError> {
    let arch = file.get_str("general.architecture")?.to_string();
    config::ModelConfig::family(&arch)?;
    decoder::Model::load(file, &arch)
}
