//! Token ids equal llama.cpp's on its own vocabulary test files (`models/ggml-vocab-*.gguf`
//! with `.inp`/`.out`, from the llama-cpp-python 0.3.36 source package; fetched and cached by
//! `scripts/fetch-vocab-tests.sh`, which scripts/test.sh runs). Every file whose tokenizer we
//! support must match on every case; every other file must be refused with one clear error.

use std::path::PathBuf;

use keyformer::gguf::GgufFile;
use keyformer::tokenizer::Tokenizer;

/// The folder of the vocabulary files: `$KEYFORMER_VOCAB_DIR`, else the cache's copy.
fn vocab_dir() -> PathBuf {
    let dir = std::env::var_os("KEYFORMER_VOCAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| keyformer::registry::cache_dir().expect("cache dir").join("llama.cpp/0.3.36/vocab"));
    assert!(dir.is_dir(), "{} is missing: run scripts/fetch-vocab-tests.sh", dir.display());
    dir
}

/// The cases of one file: (text, llama.cpp's ids).
fn cases(gguf: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(gguf.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(gguf.with_extension("gguf.out")).unwrap();
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    if texts.last() == Some(&"") {
        texts.pop();
    }
    let ids: Vec<Vec<u32>> = out.lines().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
    assert_eq!(texts.len(), ids.len(), "{}: inputs and outputs", gguf.display());
    texts.into_iter().map(String::from).zip(ids).collect()
}

#[test]
fn token_ids_equal_llama_cpp_on_its_vocabulary_files() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(vocab_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf") && p.with_extension("gguf.out").is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "vocabulary files found: {files:?}");
    let mut supported = Vec::new();
    for path in &files {
        let name = path.file_stem().unwrap().to_string_lossy().trim_start_matches("ggml-vocab-").to_string();
        let f = GgufFile::open(path).unwrap();
        let tok = match Tokenizer::from_metadata_with(&f.metadata, false) {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.starts_with("unsupported tokenizer model") || msg.starts_with("unknown pre-tokenizer"),
                    "{name}: {msg}"
                );
                eprintln!("{name}: refused ({msg})");
                continue;
            }
        };
        let cases = cases(path);
        for (text, want) in &cases {
            assert_eq!(&tok.encode(text, false).unwrap(), want, "{name}: text {text:?}");
        }
        eprintln!("{name}: {} cases equal", cases.len());
        supported.push(name);
    }
    // What we claim to support (README's table) must have been checked here.
    for claimed in ["llama-spm", "phi-3", "gpt-2", "llama-bpe", "qwen2", "starcoder", "refact", "mpt", "command-r"] {
        assert!(supported.iter().any(|s| s == claimed), "{claimed} was not checked: {supported:?}");
    }
}

/// The chat templates these files carry (Phi-3, Qwen2, Qwen3.5, Command-R, Gemma 4) render a
/// system message and a user turn through our minijinja setup, ending with the assistant's
/// generation prompt, and the rendered prompt tokenizes with its special tokens.
#[test]
fn their_chat_templates_render_a_system_message() {
    use keyformer::chat::{render, ChatMessage};
    let mut rendered = 0;
    for entry in std::fs::read_dir(vocab_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "gguf") {
            continue;
        }
        let f = GgufFile::open(&path).unwrap();
        let Some(template) = f.get("tokenizer.chat_template").and_then(|v| v.as_str()) else { continue };
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let messages = [
            ChatMessage { role: "system".into(), content: "You answer in French.".into() },
            ChatMessage { role: "user".into(), content: "What colour is the sky?".into() },
        ];
        let text = render(template, &messages, "<s>", "</s>").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.contains("You answer in French.") && text.contains("What colour is the sky?"), "{name}: {text}");
        assert!(
            text.trim_end().len() > text.find("What colour is the sky?").unwrap() + 23,
            "{name}: no generation prompt"
        );
        if let Ok(tok) = Tokenizer::from_metadata(&f.metadata) {
            assert!(!tok.encode(&text, true).unwrap().is_empty());
        }
        eprintln!("{name}: {text:?}");
        rendered += 1;
    }
    assert!(rendered >= 3, "templates rendered: {rendered}");
}
