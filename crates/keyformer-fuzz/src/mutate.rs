//! Structured mutations, deterministic for a seed: bytes (GGUF files), text (tokenizers,
//! templates) and JSON (server requests).

use keyformer::sampling::Rng;
use serde_json::{json, Value};

pub struct Mutator {
    pub rng: Rng,
}

/// Values that sit on the edges of a 32- or 64-bit field.
const WORDS: [u64; 14] = [
    0,
    1,
    2,
    3,
    7,
    64,
    0xff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// Pieces of text tokenizers and templates treat specially.
const PIECES: [&str; 24] = [
    "<|im_start|>",
    "<|im_end|>",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "<start_of_turn>",
    "<unk>",
    "\u{2581}",
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    "\u{0}",
    "\u{200d}",
    "\u{feff}",
    "\u{fffd}",
    "\r\n",
    "\t\t",
    "    ",
    "ǅ",
    "𝔘𝔫𝔦",
    "日本語のテキスト",
    "🙂‍↕️",
];

impl Mutator {
    pub fn new(seed: u64) -> Self {
        Self { rng: Rng::new(seed) }
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.rng.next_u64() % n as u64) as usize
        }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rng.next_u64() % 100 < percent
    }

    /// A position, in `hot` (the part of a file whose bytes mean something: GGUF's header,
    /// metadata and tensor table) nine times in ten.
    fn position(&mut self, len: usize, hot: usize) -> usize {
        let hot = hot.min(len);
        if hot > 0 && self.chance(90) {
            self.below(hot)
        } else {
            self.below(len)
        }
    }

    /// One to four mutations of `seed`: bit flips, edge values written over aligned words,
    /// NaN and infinities over floats, cuts, deleted, inserted and duplicated runs.
    pub fn bytes(&mut self, seed: &[u8], hot: usize) -> Vec<u8> {
        let mut b = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            if b.is_empty() {
                b.push(self.rng.next_u64() as u8);
                continue;
            }
            let at = self.position(b.len(), hot);
            match self.below(8) {
                0 => b[at] ^= 1 << self.below(8),
                1 | 2 => {
                    let word = WORDS[self.below(WORDS.len())];
                    let width = if self.chance(50) { 4 } else { 8 };
                    let at = at & !(width - 1);
                    let bytes = word.to_le_bytes();
                    let end = (at + width).min(b.len());
                    b[at..end].copy_from_slice(&bytes[..end - at]);
                }
                3 => {
                    let f = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1.0, 0.0, 1e30][self.below(6)];
                    let at = at & !3;
                    let end = (at + 4).min(b.len());
                    b[at..end].copy_from_slice(&f.to_le_bytes()[..end - at]);
                }
                4 => b.truncate(at),
                5 => {
                    let n = (1 + self.below(64)).min(b.len() - at);
                    b.drain(at..at + n);
                }
                6 => {
                    let run: Vec<u8> = (0..1 + self.below(32)).map(|_| self.rng.next_u64() as u8).collect();
                    b.splice(at..at, run);
                }
                _ => {
                    let from = self.position(b.len(), hot);
                    let n = (1 + self.below(64)).min(b.len() - from);
                    let run = b[from..from + n].to_vec();
                    b.splice(at..at, run);
                }
            }
        }
        b
    }

    /// Text: a seed text cut and spliced with special pieces, random characters from every
    /// Unicode plane, and runs of whitespace or digits.
    pub fn text(&mut self, seed: &str, max_chars: usize) -> String {
        let chars: Vec<char> = seed.chars().collect();
        let start = self.below(chars.len() + 1);
        let len = self.below(max_chars.min(chars.len().saturating_sub(start)) + 1);
        let mut out: String = chars[start..start + len].iter().collect();
        for _ in 0..self.below(6) {
            let piece: String = match self.below(5) {
                0 => PIECES[self.below(PIECES.len())].to_string(),
                1 => (0..1 + self.below(8)).filter_map(|_| char::from_u32(self.below(0x11_0000) as u32)).collect(),
                2 => " ".repeat(1 + self.below(40)),
                3 => (0..1 + self.below(30)).map(|_| char::from(b'0' + self.below(10) as u8)).collect(),
                _ => PIECES[self.below(PIECES.len())].chars().take(1 + self.below(3)).collect(),
            };
            let at = out.char_indices().map(|(i, _)| i).nth(self.below(out.chars().count() + 1)).unwrap_or(out.len());
            out.insert_str(at, &piece);
        }
        out
    }

    /// A hostile value for a JSON field.
    fn value(&mut self, seed_text: &str) -> Value {
        match self.below(12) {
            0 => Value::Null,
            1 => json!(self.chance(50)),
            2 => json!(WORDS[self.below(WORDS.len())]),
            3 => json!(-(self.below(1000) as i64) - 1),
            4 => {
                let floats = [1e308, -1e308, 0.5, 1e-300];
                json!(floats[self.below(floats.len())])
            }
            5 => json!(self.below(5000)),
            6 => json!(self.text(seed_text, 200)),
            7 => {
                let amounts = ["50%", "0%", "150%", "-3%", "1e9%", "nan%", "12", "0x10", ""];
                json!(amounts[self.below(amounts.len())])
            }
            8 => Value::Array((0..self.below(6)).map(|_| json!(self.below(70_000))).collect()),
            9 => {
                let specs =
                    ["full", "keyformer", "h2o:budget=0", "sink:sinks=99", "keyformer:tau=0-0", "lru", "tova:window=x"];
                json!(specs[self.below(specs.len())])
            }
            10 => {
                let kind = ["text", "json_object", "json_schema"][self.below(3)];
                json!({ "type": kind })
            }
            _ => {
                let depth = 1 + self.below(200);
                serde_json::from_str(&format!("{}{}", "[".repeat(depth), "]".repeat(depth))).unwrap_or(Value::Null)
            }
        }
    }

    /// A request body: fields of a seed body replaced, removed or added (every field either
    /// endpoint knows), messages and KV settings mutated inside; sometimes the text itself is
    /// then cut or flipped.
    pub fn request(&mut self, seed: &Value, seed_text: &str) -> Vec<u8> {
        const FIELDS: [&str; 26] = [
            "model",
            "prompt",
            "messages",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "repeat_penalty",
            "seed",
            "stop",
            "n",
            "stream",
            "stream_options",
            "kv_cache",
            "logprobs",
            "top_logprobs",
            "response_format",
            "frequency_penalty",
            "presence_penalty",
            "logit_bias",
            "tools",
            "best_of",
            "echo",
            "suffix",
        ];
        let mut v = seed.clone();
        if let Some(obj) = v.as_object_mut() {
            for _ in 0..1 + self.below(4) {
                let field = FIELDS[self.below(FIELDS.len())];
                match self.below(5) {
                    0 => {
                        obj.remove(field);
                    }
                    1 if field == "kv_cache" => {
                        let keys = ["policy", "budget", "recent", "min_budget", "extra"];
                        let kv: serde_json::Map<String, Value> = (0..self.below(4))
                            .map(|_| (keys[self.below(keys.len())].to_string(), self.value(seed_text)))
                            .collect();
                        obj.insert(field.into(), Value::Object(kv));
                    }
                    1 if field == "messages" => {
                        let roles = ["system", "user", "assistant", "tool", ""];
                        let messages: Vec<Value> = (0..self.below(5))
                            .map(|_| {
                                let role = if self.chance(80) {
                                    json!(roles[self.below(roles.len())])
                                } else {
                                    self.value(seed_text)
                                };
                                json!({"role": role, "content": self.text(seed_text, 300)})
                            })
                            .collect();
                        obj.insert(field.into(), Value::Array(messages));
                    }
                    _ => {
                        let value = self.value(seed_text);
                        obj.insert(field.into(), value);
                    }
                }
            }
        } else {
            v = self.value(seed_text);
        }
        let text = serde_json::to_vec(&v).unwrap_or_default();
        if self.chance(20) {
            self.bytes(&text, text.len())
        } else {
            text
        }
    }
}
