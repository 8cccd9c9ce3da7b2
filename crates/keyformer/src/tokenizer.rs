//! Tokenizer built from GGUF metadata with the `tokenizers` crate.
//!
//! Byte-level BPE (`tokenizer.ggml.model = gpt2`): vocabulary and merges from the file, the
//! pre-tokenizer's split regexes chosen by `tokenizer.ggml.pre` (the same table llama.cpp
//! uses, since llama.cpp is our reference for token ids), control and user-defined tokens
//! matched whole before BPE, BOS/EOS ids and `add_bos_token` from the metadata. An unknown
//! `pre` is an error rather than a guess: a wrong split silently changes every token id.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use std::collections::BTreeMap;

use crate::gguf::{GgufFile, MetaValue};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("unsupported tokenizer model '{0}' (supported: gpt2 byte-level BPE)")]
    UnsupportedModel(String),
    #[error("unknown pre-tokenizer '{0}' (supported: {1})")]
    UnknownPre(String, String),
    #[error("tokenizer metadata: {0}")]
    Metadata(String),
    #[error("tokenizer: {0}")]
    Library(String),
}

/// GPT-2's split regex (also the second stage of the digit-splitting variants).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizer behaviour for one `tokenizer.ggml.pre` value.
struct PreSpec {
    /// Applied in order; each splits the pieces the previous produced.
    regexes: &'static [&'static str],
    /// Llama-3 style: a pre-token that is itself in the vocabulary is not merged further.
    ignore_merges: bool,
    /// Default for `add_bos_token` when the file does not say.
    add_bos: bool,
}

/// llama.cpp's fallback for BPE files that name no pre-tokenizer.
const DEFAULT_REGEXES: &[&str] = &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"];

fn pre_spec(pre: &str) -> Option<PreSpec> {
    Some(match pre {
        "default" => PreSpec { regexes: DEFAULT_REGEXES, ignore_merges: false, add_bos: false },
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" => {
            PreSpec { regexes: &[GPT2], ignore_merges: false, add_bos: false }
        }
        // SmolLM, StarCoder and friends split every digit on its own first.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => {
            PreSpec { regexes: &[r"\p{N}", GPT2], ignore_merges: false, add_bos: false }
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => {
            PreSpec { regexes: &[LLAMA3], ignore_merges: true, add_bos: true }
        }
        "qwen2" | "stablelm2" => PreSpec { regexes: &[QWEN2], ignore_merges: false, add_bos: false },
        _ => return None,
    })
}

const SUPPORTED_PRE: &str = "default, gpt-2, phi-2, mpt, olmo, smollm, starcoder, refact, command-r, codeshell, \
    llama3, llama-v3, llama-bpe, falcon3, qwen2, stablelm2";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A model's tokenizer with its special-token ids.
pub struct Tokenizer {
    inner: HfTokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end generation: EOS, EOT and end-of-turn control tokens.
    pub end_of_generation: Vec<u32>,
    pub add_bos: bool,
    tokens: Vec<String>,
}

impl Tokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, TokenizerError> {
        Self::from_metadata(&f.metadata)
    }

    /// Build from GGUF metadata key/values (tests vary `tokenizer.ggml.pre` this way).
    pub fn from_metadata(md: &BTreeMap<String, MetaValue>) -> Result<Self, TokenizerError> {
        let missing = |k: &str| TokenizerError::Metadata(format!("missing or mistyped key '{k}'"));
        let get_str = |k: &str| md.get(k).and_then(MetaValue::as_str).ok_or_else(|| missing(k));
        let get_array = |k: &str| md.get(k).and_then(MetaValue::as_array).ok_or_else(|| missing(k));
        let model = get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let pre_name = get_str("tokenizer.ggml.pre").unwrap_or("default");
        let spec =
            pre_spec(pre_name).ok_or_else(|| TokenizerError::UnknownPre(pre_name.into(), SUPPORTED_PRE.into()))?;

        let tokens: Vec<String> = get_array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| TokenizerError::Metadata("tokenizer.ggml.tokens holds a non-string".into()))?;
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges: Vec<(String, String)> = get_array("tokenizer.ggml.merges")?
            .iter()
            .map(|m| {
                let s = m.as_str()?;
                let (a, b) = s.split_once(' ')?;
                Some((a.to_string(), b.to_string()))
            })
            .collect::<Option<_>>()
            .ok_or_else(|| TokenizerError::Metadata("a merge is not 'left right'".into()))?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(spec.ignore_merges)
            .build()
            .map_err(|e| TokenizerError::Library(e.to_string()))?;

        let mut pre: Vec<PreTokenizerWrapper> = Vec::new();
        for re in spec.regexes {
            let split = Split::new(SplitPattern::Regex((*re).to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| TokenizerError::Library(e.to_string()))?;
            pre.push(split.into());
        }
        pre.push(ByteLevel::new(false, false, false).into());

        let mut inner = HfTokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(Sequence::new(pre)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        // Control and user-defined tokens are matched whole in the text, before BPE.
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(MetaValue::Array(a)) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, &t)| AddedToken::from(s.clone(), t == TOKEN_TYPE_CONTROL))
            .collect();
        inner.add_special_tokens(&specials);

        let id = |k: &str| {
            md.get(k)
                .and_then(MetaValue::as_i64)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < tokens.len())
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let mut end_of_generation: Vec<u32> =
            [eos, id("tokenizer.ggml.eot_token_id"), id("tokenizer.ggml.eom_token_id")].into_iter().flatten().collect();
        // Chat models end turns with control tokens that are not always declared as EOT.
        for name in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>"] {
            if let Some(i) = tokens.iter().position(|t| t == name) {
                if types.get(i) == Some(&TOKEN_TYPE_CONTROL) {
                    end_of_generation.push(i as u32);
                }
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        let add_bos = md.get("tokenizer.ggml.add_bos_token").and_then(MetaValue::as_bool).unwrap_or(spec.add_bos);
        Ok(Self { inner, bos, eos, end_of_generation, add_bos, tokens })
    }

    /// A byte-level tokenizer for random-weight models, which have no vocabulary of their own:
    /// one token per byte (GPT-2's byte alphabet, no merges), then filler tokens `<|tN|>` up to
    /// `vocab_size`. No BOS and no end-of-generation token, so every answer runs to its
    /// `max_tokens`, as a benchmark wants.
    pub fn byte_level(vocab_size: usize) -> Result<Self, TokenizerError> {
        if vocab_size < 256 {
            return Err(TokenizerError::Metadata(format!(
                "a byte-level vocabulary needs at least 256 tokens, the model has {vocab_size}"
            )));
        }
        // GPT-2's byte alphabet: printable bytes stand for themselves, the others for 256 + n.
        let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let mut shifted = 0;
        let mut tokens: Vec<MetaValue> = (0..256u32)
            .map(|b| {
                let c = if printable(b) {
                    b
                } else {
                    shifted += 1;
                    255 + shifted
                };
                MetaValue::String(char::from_u32(c).expect("a valid char").to_string())
            })
            .collect();
        tokens.extend((256..vocab_size).map(|i| MetaValue::String(format!("<|t{i}|>"))));
        let md = BTreeMap::from([
            ("tokenizer.ggml.model".to_string(), MetaValue::String("gpt2".into())),
            ("tokenizer.ggml.pre".to_string(), MetaValue::String("gpt2".into())),
            ("tokenizer.ggml.tokens".to_string(), MetaValue::Array(tokens)),
            ("tokenizer.ggml.merges".to_string(), MetaValue::Array(Vec::new())),
        ]);
        Self::from_metadata(&md)
    }

    /// Token ids of `text`; special tokens written in the text are recognised. `add_bos`
    /// prepends BOS when the model asks for it.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| TokenizerError::Library(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids` (special tokens included, as they were generated).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(|e| TokenizerError::Library(e.to_string()))
    }

    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_tokenizer_has_one_token_per_byte_and_round_trips() {
        let t = Tokenizer::byte_level(1000).unwrap();
        assert_eq!(t.vocab_size(), 1000);
        let text = "Keyformer keeps key tokens, ünïcode and\ttabs.";
        let ids = t.encode(text, true).unwrap();
        assert_eq!(ids.len(), text.len(), "one token per byte, no BOS");
        assert_eq!(t.decode(&ids).unwrap(), text);
        // Byte b is token b (the order of GPT-2's alphabet).
        assert_eq!(t.encode("A", false).unwrap(), vec![b'A' as u32]);
        assert_eq!(t.encode(" ", false).unwrap(), vec![b' ' as u32]);
        assert!(!(0..1000).any(|i| t.is_end_of_generation(i)));
        assert_eq!(t.decode(&[300]).unwrap(), "<|t300|>");
        assert!(Tokenizer::byte_level(100).is_err());
    }
}
