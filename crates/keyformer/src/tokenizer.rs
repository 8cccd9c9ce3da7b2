//! Tokenizers built from GGUF metadata.
//!
//! SentencePiece (`tokenizer.ggml.model = llama`: Llama 2, Mistral, Gemma, Phi-3) is
//! [`spm::Spm`], llama.cpp's algorithm: spaces become U+2581 with one prepended to each run of
//! text, adjacent pieces merge by the highest score while the merge is in the vocabulary, and
//! a piece that is not falls back to its bytes (`<0xXX>` tokens).
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
    #[error("unsupported tokenizer model '{0}' (supported: gpt2 byte-level BPE, llama SentencePiece)")]
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

/// What a Hugging Face folder says about its tokenizer besides `tokenizer.json`.
#[derive(Debug, Clone, Default)]
pub struct HfTokenizerSettings {
    /// `tokenizer_config.json`'s `bos_token` / `eos_token`.
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// `generation_config.json`'s (or `config.json`'s) ids.
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    /// `tokenizer_config.json`'s `add_bos_token`; when absent, whether the tokenizer's
    /// post-processor adds BOS (what transformers does).
    pub add_bos: Option<bool>,
    /// The model's vocabulary (its embedding rows), at least the tokenizer's.
    pub vocab_size: usize,
}

/// The algorithm behind a [`Tokenizer`].
enum Inner {
    /// Byte-level BPE from GGUF metadata, or anything a `tokenizer.json` describes.
    Bpe(Box<HfTokenizer>),
    Spm(spm::Spm),
}

/// A model's tokenizer with its special-token ids.
pub struct Tokenizer {
    inner: Inner,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end generation: EOS, EOT and end-of-turn control tokens.
    pub end_of_generation: Vec<u32>,
    pub add_bos: bool,
    tokens: Vec<String>,
    /// Whether special tokens written in a text are read as such (llama.cpp's `parse_special`).
    parse_special: bool,
}

impl Tokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, TokenizerError> {
        Self::from_metadata(&f.metadata)
    }

    /// Build from GGUF metadata key/values (tests vary `tokenizer.ggml.pre` this way).
    pub fn from_metadata(md: &BTreeMap<String, MetaValue>) -> Result<Self, TokenizerError> {
        Self::from_metadata_with(md, true)
    }

    /// [`from_metadata`](Self::from_metadata); with `parse_special` false, special tokens
    /// written in a text are tokenized as plain text (llama.cpp's vocabulary tests do this).
    pub fn from_metadata_with(md: &BTreeMap<String, MetaValue>, parse_special: bool) -> Result<Self, TokenizerError> {
        let missing = |k: &str| TokenizerError::Metadata(format!("missing or mistyped key '{k}'"));
        let get_str = |k: &str| md.get(k).and_then(MetaValue::as_str).ok_or_else(|| missing(k));
        let get_array = |k: &str| md.get(k).and_then(MetaValue::as_array).ok_or_else(|| missing(k));
        let model = get_str("tokenizer.ggml.model")?;
        let tokens: Vec<String> = get_array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| TokenizerError::Metadata("tokenizer.ggml.tokens holds a non-string".into()))?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(MetaValue::Array(a)) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let (inner, default_add_bos) = match model {
            "gpt2" => (Inner::Bpe(Box::new(Self::bpe(md, &tokens, &types, parse_special)?)), Self::bpe_add_bos(md)?),
            "llama" => {
                let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
                    Some(MetaValue::Array(a)) => a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
                    _ => vec![0.0; tokens.len()],
                };
                let add_space_prefix =
                    md.get("tokenizer.ggml.add_space_prefix").and_then(MetaValue::as_bool).unwrap_or(true);
                (Inner::Spm(spm::Spm::new(&tokens, &scores, &types, add_space_prefix)), true)
            }
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        Self::finish(md, inner, tokens, types, default_add_bos, parse_special)
    }

    /// A Hugging Face `tokenizer.json` (any model, normalizer and pre-tokenizer the
    /// `tokenizers` crate reads), with the folder's special tokens. Ids the model has beyond
    /// the tokenizer's (padded embeddings) decode to nothing.
    pub fn from_hf_json(json: &[u8], s: &HfTokenizerSettings) -> Result<Self, TokenizerError> {
        let inner = HfTokenizer::from_bytes(json).map_err(|e| TokenizerError::Library(e.to_string()))?;
        let vocab = inner.get_vocab(true);
        let n = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        if n > s.vocab_size {
            return Err(TokenizerError::Metadata(format!(
                "the tokenizer has ids up to {}, the model's vocabulary {} tokens",
                n - 1,
                s.vocab_size
            )));
        }
        let mut tokens = vec![String::new(); s.vocab_size];
        for (t, &i) in &vocab {
            tokens[i as usize] = t.clone();
        }
        let mut types = vec![1i64; s.vocab_size];
        for (&i, added) in inner.get_added_tokens_decoder().iter() {
            if let Some(t) = types.get_mut(i as usize) {
                *t = if added.special { TOKEN_TYPE_CONTROL } else { TOKEN_TYPE_USER_DEFINED };
            }
        }
        let id_of = |text: &Option<String>| text.as_deref().and_then(|t| inner.token_to_id(t));
        let bos = id_of(&s.bos_token).or(s.bos_id);
        let eos = id_of(&s.eos_token).or(s.eos_ids.first().copied());
        // transformers adds what the post-processor adds.
        let post_adds_bos = || -> Result<bool, TokenizerError> {
            let with = inner.encode_fast("a", true).map_err(|e| TokenizerError::Library(e.to_string()))?;
            Ok(bos.is_some() && with.get_ids().first().copied() == bos)
        };
        let add_bos = match s.add_bos {
            Some(b) => b,
            None => post_adds_bos()?,
        };
        let mut md = BTreeMap::new();
        for (key, id) in [("bos", bos), ("eos", eos)] {
            if let Some(id) = id {
                md.insert(format!("tokenizer.ggml.{key}_token_id"), MetaValue::U32(id));
            }
        }
        md.insert("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(add_bos));
        let mut t = Self::finish(&md, Inner::Bpe(Box::new(inner)), tokens, types, add_bos, true)?;
        t.end_of_generation.extend(s.eos_ids.iter().filter(|&&i| (i as usize) < s.vocab_size));
        t.end_of_generation.sort_unstable();
        t.end_of_generation.dedup();
        Ok(t)
    }

    /// `add_bos_token`'s default for a BPE file's pre-tokenizer.
    fn bpe_add_bos(md: &BTreeMap<String, MetaValue>) -> Result<bool, TokenizerError> {
        let pre_name = md.get("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("default");
        let spec =
            pre_spec(pre_name).ok_or_else(|| TokenizerError::UnknownPre(pre_name.into(), SUPPORTED_PRE.into()))?;
        Ok(spec.add_bos)
    }

    /// The byte-level BPE of a `gpt2` file.
    fn bpe(
        md: &BTreeMap<String, MetaValue>,
        tokens: &[String],
        types: &[i64],
        parse_special: bool,
    ) -> Result<HfTokenizer, TokenizerError> {
        let missing = |k: &str| TokenizerError::Metadata(format!("missing or mistyped key '{k}'"));
        let get_str = |k: &str| md.get(k).and_then(MetaValue::as_str).ok_or_else(|| missing(k));
        let get_array = |k: &str| md.get(k).and_then(MetaValue::as_array).ok_or_else(|| missing(k));
        let pre_name = get_str("tokenizer.ggml.pre").unwrap_or("default");
        let spec =
            pre_spec(pre_name).ok_or_else(|| TokenizerError::UnknownPre(pre_name.into(), SUPPORTED_PRE.into()))?;

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

        // Control and user-defined tokens are matched whole in the text, before BPE; as in
        // llama.cpp, user-defined ones (e.g. runs of spaces) even when specials are not parsed.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(_, &t)| (t == TOKEN_TYPE_CONTROL && parse_special) || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, &t)| AddedToken::from(s.clone(), t == TOKEN_TYPE_CONTROL))
            .collect();
        inner.add_special_tokens(&specials);
        Ok(inner)
    }

    /// Special ids and flags common to every tokenizer model.
    fn finish(
        md: &BTreeMap<String, MetaValue>,
        inner: Inner,
        tokens: Vec<String>,
        types: Vec<i64>,
        default_add_bos: bool,
        parse_special: bool,
    ) -> Result<Self, TokenizerError> {
        // A special token id must name a token of the vocabulary (-1 means none, as llama.cpp
        // writes it).
        let id = |k: &str| -> Result<Option<u32>, TokenizerError> {
            let Some(v) = md.get(k).and_then(MetaValue::as_i64) else { return Ok(None) };
            match u32::try_from(v) {
                Ok(id) if (id as usize) < tokens.len() => Ok(Some(id)),
                _ if v == -1 => Ok(None),
                _ => Err(TokenizerError::Metadata(format!(
                    "{k} is {v}, outside the vocabulary of {} tokens",
                    tokens.len()
                ))),
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let mut end_of_generation: Vec<u32> =
            [eos, id("tokenizer.ggml.eot_token_id")?, id("tokenizer.ggml.eom_token_id")?]
                .into_iter()
                .flatten()
                .collect();
        // Chat models end turns with control tokens that are not always declared as EOT.
        for name in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>"] {
            if let Some(i) = tokens.iter().position(|t| t == name) {
                if types.get(i) == Some(&TOKEN_TYPE_CONTROL) {
                    end_of_generation.push(i as u32);
                }
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        let add_bos = md.get("tokenizer.ggml.add_bos_token").and_then(MetaValue::as_bool).unwrap_or(default_add_bos);
        Ok(Self { inner, bos, eos, end_of_generation, add_bos, tokens, parse_special })
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
        let mut ids = Vec::new();
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        match &self.inner {
            Inner::Bpe(t) => {
                let enc = t.encode_fast(text, false).map_err(|e| TokenizerError::Library(e.to_string()))?;
                ids.extend_from_slice(enc.get_ids());
            }
            Inner::Spm(t) => t.encode(text, self.parse_special, &mut ids),
        }
        Ok(ids)
    }

    /// Text of `ids` (special tokens included, as they were generated).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match &self.inner {
            Inner::Bpe(t) => t.decode(ids, false).map_err(|e| TokenizerError::Library(e.to_string())),
            Inner::Spm(t) => Ok(t.decode(ids)),
        }
    }

    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }
    /// The most bytes of text one token can stand for: the longest vocabulary entry (its
    /// written form is never shorter than the text it encodes), or 4 (one character through
    /// byte fallback or `<unk>`). A text longer than this times N bytes cannot be N tokens, so
    /// an oversized prompt is refused before it is tokenised.
    pub fn max_token_bytes(&self) -> usize {
        self.tokens.iter().map(String::len).max().unwrap_or(0).max(4)
    }
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }
}

mod spm {
    //! llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm`), written from its behaviour.

    use std::collections::{BinaryHeap, HashMap};

    use super::{TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED};

    const SPACE: &str = "\u{2581}";

    pub struct Spm {
        tokens: Vec<String>,
        scores: Vec<f32>,
        ids: HashMap<String, u32>,
        /// `<0xXX>` token of each byte.
        byte_tokens: [Option<u32>; 256],
        /// Control and user-defined tokens, longest first, each with whether it is a control
        /// token (matched whole only when parsing specials; user-defined ones always).
        specials: Vec<(String, u32, bool)>,
        unknown: u32,
        add_space_prefix: bool,
    }

    /// A candidate merge of two adjacent pieces.
    #[derive(PartialEq)]
    struct Bigram {
        score: f32,
        left: usize,
        len: usize,
    }
    impl Eq for Bigram {}
    impl Ord for Bigram {
        /// Highest score first, then the leftmost.
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
        }
    }
    impl PartialOrd for Bigram {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }

    /// A piece of the text: a byte range, linked to its neighbours.
    #[derive(Clone, Copy)]
    struct Piece {
        start: usize,
        len: usize,
        prev: Option<usize>,
        next: Option<usize>,
    }

    impl Spm {
        pub fn new(tokens: &[String], scores: &[f32], types: &[i64], add_space_prefix: bool) -> Self {
            let ids: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
            let mut byte_tokens = [None; 256];
            for (b, slot) in byte_tokens.iter_mut().enumerate() {
                *slot = ids.get(&format!("<0x{b:02X}>")).copied();
            }
            let mut specials: Vec<(String, u32, bool)> = tokens
                .iter()
                .zip(types)
                .enumerate()
                .filter(|(_, (t, &ty))| (ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED) && !t.is_empty())
                .map(|(i, (t, &ty))| (t.clone(), i as u32, ty == TOKEN_TYPE_CONTROL))
                .collect();
            specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()));
            let unknown = ids.get("<unk>").copied().unwrap_or(0);
            Self {
                tokens: tokens.to_vec(),
                scores: scores.to_vec(),
                ids,
                byte_tokens,
                specials,
                unknown,
                add_space_prefix,
            }
        }

        /// Append the ids of `text`: runs of plain text between special tokens (when parsed)
        /// are each tokenized with a space prepended to the first of them and after a special.
        pub fn encode(&self, text: &str, parse_special: bool, out: &mut Vec<u32>) {
            // Special tokens claim their places first, longest first over the whole text (as
            // llama.cpp partitions it), one scan per token: no rescan after every match.
            let mut claimed: Vec<(usize, usize, u32)> = Vec::new(); // (start, end, id), disjoint
            for (s, id, control) in &self.specials {
                if *control && !parse_special {
                    continue;
                }
                for (at, _) in text.match_indices(s.as_str()) {
                    let end = at + s.len();
                    let i = claimed.partition_point(|&(a, _, _)| a < at);
                    let free_before = i == 0 || claimed[i - 1].1 <= at;
                    let free_after = i == claimed.len() || claimed[i].0 >= end;
                    if free_before && free_after {
                        claimed.insert(i, (at, end, *id));
                    }
                }
            }
            let mut prev_special = true;
            let mut from = 0;
            for piece in claimed.iter().map(Some).chain([None]) {
                let plain = &text[from..piece.map_or(text.len(), |p| p.0)];
                if !plain.is_empty() {
                    let mut t = String::with_capacity(plain.len() + 3);
                    if self.add_space_prefix && prev_special {
                        t.push(' ');
                    }
                    t.push_str(plain);
                    self.encode_run(&t.replace(' ', SPACE), out);
                    prev_special = false;
                }
                if let Some(&(_, end, id)) = piece {
                    out.push(id);
                    prev_special = true;
                    from = end;
                }
            }
        }

        /// One run of text (spaces already escaped): characters merged greedily by score.
        fn encode_run(&self, text: &str, out: &mut Vec<u32>) {
            let mut pieces: Vec<Piece> = Vec::new();
            for (i, (start, c)) in text.char_indices().enumerate() {
                pieces.push(Piece { start, len: c.len_utf8(), prev: i.checked_sub(1), next: Some(i + 1) });
            }
            let Some(last) = pieces.last_mut() else { return };
            last.next = None;
            let mut queue = BinaryHeap::new();
            // Merges made, by the resulting piece's (start, len): its two parts.
            let mut made: HashMap<(usize, usize), ((usize, usize), (usize, usize))> = HashMap::new();
            let try_add = |queue: &mut BinaryHeap<Bigram>, pieces: &[Piece], left: usize| {
                let Some(right) = pieces[left].next else { return };
                let (l, r) = (pieces[left], pieces[right]);
                let piece = &text[l.start..r.start + r.len];
                if let Some(&id) = self.ids.get(piece) {
                    let score = self.scores.get(id as usize).copied().unwrap_or(0.0);
                    queue.push(Bigram { score, left, len: piece.len() });
                }
            };
            for i in 0..pieces.len() {
                try_add(&mut queue, &pieces, i);
            }
            while let Some(b) = queue.pop() {
                let left = b.left;
                let Some(right) = pieces[left].next else { continue };
                // Skip a bigram whose pieces changed since it was queued.
                if pieces[left].len == 0 || pieces[left].len + pieces[right].len != b.len {
                    continue;
                }
                made.insert(
                    (pieces[left].start, b.len),
                    ((pieces[left].start, pieces[left].len), (pieces[right].start, pieces[right].len)),
                );
                pieces[left].len = b.len;
                pieces[left].next = pieces[right].next;
                pieces[right].len = 0;
                if let Some(n) = pieces[left].next {
                    pieces[n].prev = Some(left);
                }
                if let Some(p) = pieces[left].prev {
                    try_add(&mut queue, &pieces, p);
                }
                try_add(&mut queue, &pieces, left);
            }
            let mut i = Some(0);
            while let Some(k) = i {
                let p = pieces[k];
                self.resegment(text, (p.start, p.len), &made, out);
                i = p.next;
            }
        }

        /// A final piece's id, or its parts' (a merge whose piece is not a token), or its bytes.
        fn resegment(
            &self,
            text: &str,
            (start, len): (usize, usize),
            made: &HashMap<(usize, usize), ((usize, usize), (usize, usize))>,
            out: &mut Vec<u32>,
        ) {
            let piece = &text[start..start + len];
            if let Some(&id) = self.ids.get(piece) {
                out.push(id);
                return;
            }
            if let Some(&(a, b)) = made.get(&(start, len)) {
                self.resegment(text, a, made, out);
                self.resegment(text, b, made, out);
                return;
            }
            for &byte in piece.as_bytes() {
                out.push(self.byte_tokens[byte as usize].unwrap_or(self.unknown));
            }
        }

        /// The text of `ids`: U+2581 back to spaces, byte tokens to their bytes. The space the
        /// encoder prepends is kept (as llama.cpp's token pieces keep it), so that the text of a
        /// sequence is the concatenation of its tokens' texts (streaming decodes a suffix).
        pub fn decode(&self, ids: &[u32]) -> String {
            let mut bytes = Vec::new();
            for &id in ids {
                let Some(t) = self.tokens.get(id as usize) else { continue };
                match t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).filter(|h| h.len() == 2) {
                    Some(hex) if self.byte_tokens.iter().any(|b| *b == Some(id)) => {
                        bytes.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                    }
                    _ => bytes.extend_from_slice(t.replace(SPACE, " ").as_bytes()),
                }
            }
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made SentencePiece vocabulary: merges by score, a space before each run of text
    /// (at the start and after a special token), specials matched whole only when parsed,
    /// the longest of overlapping specials first.
    #[test]
    fn sentencepiece_merges_by_score_and_splits_on_special_tokens() {
        let tokens = ["<unk>", "<s>", "</s>", "<t>", "<tt>", "\u{2581}", "\u{2581}a", "a", "b", "\u{2581}ab", "ab"];
        let scores = [0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -3.0, -1.5, -0.5];
        // 1 normal, 3 control.
        let types = [2, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1];
        let md = BTreeMap::from([
            ("tokenizer.ggml.model".to_string(), MetaValue::String("llama".into())),
            (
                "tokenizer.ggml.tokens".to_string(),
                MetaValue::Array(tokens.iter().map(|t| MetaValue::String(t.to_string())).collect()),
            ),
            (
                "tokenizer.ggml.scores".to_string(),
                MetaValue::Array(scores.iter().map(|&v| MetaValue::F32(v)).collect()),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                MetaValue::Array(types.iter().map(|&v| MetaValue::I32(v)).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".to_string(), MetaValue::U32(1)),
            ("tokenizer.ggml.add_bos_token".to_string(), MetaValue::Bool(false)),
        ]);
        let t = Tokenizer::from_metadata(&md).unwrap();
        // " ab": "ab" (-0.5) merges before "\u{2581}a" (-2), then "\u{2581}" + "ab" -> "\u{2581}ab".
        assert_eq!(t.encode("ab", true).unwrap(), vec![9]);
        // A special token, then a run that gets its own leading space; "<tt>" wins over "<t>".
        assert_eq!(t.encode("a<tt>ab<t>b", true).unwrap(), vec![6, 4, 9, 3, 5, 8]);
        // Unparsed, the markup is text: unknown characters become <unk> (no byte tokens here).
        let plain = Tokenizer::from_metadata_with(&md, false).unwrap();
        assert_eq!(plain.encode("a<t>", false).unwrap(), vec![6, 0, 0, 0]);
        assert_eq!(t.decode(&[6, 4, 9]).unwrap(), " a<tt> ab");
        // A special token id outside the vocabulary is a corrupt file, not a silent "none";
        // -1 is llama.cpp's "none".
        for (key, id, ok) in [("eos", 99i64, false), ("bos", 11, false), ("eot", -7, false), ("eos", -1, true)] {
            let mut bad = md.clone();
            bad.insert(format!("tokenizer.ggml.{key}_token_id"), MetaValue::I64(id));
            let r = Tokenizer::from_metadata(&bad);
            assert_eq!(r.is_ok(), ok, "{key} {id}");
            if let Err(e) = r {
                assert!(e.to_string().contains("outside the vocabulary of 11 tokens"), "{e}");
            }
        }
    }

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
