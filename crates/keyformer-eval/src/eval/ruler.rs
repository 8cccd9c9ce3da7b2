//! RULER-style synthetic long-context tasks (Hsieh et al., "RULER: What's the Real Context Size
//! of Your Long-Context Language Models?", NVIDIA 2024), the ones that need no outside data:
//! needle in a haystack (single needle over three haystack/value kinds, multi-key over three,
//! multi-value, multi-query), variable tracking, common-words and frequent-words extraction.
//! The task definitions (needle counts, value kinds, word frequencies, answer lengths) follow
//! RULER's configuration; the wording of the prompts is ours. Haystacks are real prose (any
//! documents: the Paul Graham essays of `scripts/fetch-texts.sh`, our corpora) or, where RULER
//! uses them, repeated filler sentences or needles.
//!
//! A case is text (instruction, context, question, answer prefix, expected answers), sized in
//! the model's own tokens and deterministic for (task, length, sample, seed), so the same cases
//! can be exported and run through kvpress. Scored as RULER scores: the share of the expected
//! answers found in the output (case-insensitive).

use serde::{Deserialize, Serialize};

/// One RULER task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RulerTask {
    /// One needle (word key, 7-digit value) in repeated filler sentences.
    NiahSingle1,
    /// One needle (word key, number) in real prose.
    NiahSingle2,
    /// One needle (word key, UUID value) in real prose.
    NiahSingle3,
    /// Four needles with different keys in prose; one is asked for.
    NiahMultikey1,
    /// A haystack made only of needles (word keys, numbers); one is asked for.
    NiahMultikey2,
    /// A haystack made only of needles (UUID keys and values); one is asked for.
    NiahMultikey3,
    /// Four values under one key in prose; all four are asked for.
    NiahMultivalue,
    /// Four needles in prose; all four keys are asked for.
    NiahMultiquery,
    /// Variable tracking: a chain of five assignments hidden in filler; every name asked for.
    Vt,
    /// Common-words extraction: ten words 30 times each among words 3 times each.
    Cwe,
    /// Frequent-words extraction: coded words drawn from a Zipf law (alpha 2); the top three.
    Fwe,
}

impl RulerTask {
    pub const ALL: [RulerTask; 11] = [
        RulerTask::NiahSingle1,
        RulerTask::NiahSingle2,
        RulerTask::NiahSingle3,
        RulerTask::NiahMultikey1,
        RulerTask::NiahMultikey2,
        RulerTask::NiahMultikey3,
        RulerTask::NiahMultivalue,
        RulerTask::NiahMultiquery,
        RulerTask::Vt,
        RulerTask::Cwe,
        RulerTask::Fwe,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RulerTask::NiahSingle1 => "niah_single_1",
            RulerTask::NiahSingle2 => "niah_single_2",
            RulerTask::NiahSingle3 => "niah_single_3",
            RulerTask::NiahMultikey1 => "niah_multikey_1",
            RulerTask::NiahMultikey2 => "niah_multikey_2",
            RulerTask::NiahMultikey3 => "niah_multikey_3",
            RulerTask::NiahMultivalue => "niah_multivalue",
            RulerTask::NiahMultiquery => "niah_multiquery",
            RulerTask::Vt => "vt",
            RulerTask::Cwe => "cwe",
            RulerTask::Fwe => "fwe",
        }
    }

    /// Tokens generated at most (RULER's per-task limits).
    pub fn answer_tokens(self) -> usize {
        match self {
            RulerTask::Vt => 30,
            RulerTask::Cwe => 120,
            RulerTask::Fwe => 50,
            _ => 128,
        }
    }
}

impl std::str::FromStr for RulerTask {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        RulerTask::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| {
            let names: Vec<&str> = RulerTask::ALL.iter().map(|t| t.name()).collect();
            format!("unknown RULER task '{s}' (available: {})", names.join(", "))
        })
    }
}

/// Where the question goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RulerMode {
    /// The context is compressed before the question is known (kvpress's protocol): the
    /// question's tokens come after the prompt's end, as decode steps.
    After,
    /// The question is part of the prompt, compressed with it.
    Inside,
}

impl RulerMode {
    pub fn name(self) -> &'static str {
        match self {
            RulerMode::After => "after",
            RulerMode::Inside => "inside",
        }
    }
}

impl std::str::FromStr for RulerMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "after" => Ok(RulerMode::After),
            "inside" => Ok(RulerMode::Inside),
            _ => Err(format!(
                "unknown RULER mode '{s}' (after: the question after compression, kvpress's \
                 protocol; inside: the question compressed with the prompt)"
            )),
        }
    }
}

/// One generated case, as text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RulerCase {
    /// `task@length#sample`.
    pub id: String,
    pub task: String,
    /// The prompt's length it was sized for, in the model's tokens.
    pub length: usize,
    /// The user message is `instruction\n\ncontext\n\nquestion`; the answer starts with
    /// `answer_prefix` after the assistant's turn begins.
    pub instruction: String,
    pub context: String,
    pub question: String,
    pub answer_prefix: String,
    pub answers: Vec<String>,
    pub max_new_tokens: usize,
}

impl RulerCase {
    /// The user message before the question (what "after" mode compresses).
    pub fn before_question(&self) -> String {
        format!("{}\n\n{}\n\n", self.instruction, self.context)
    }
}

/// RULER's `string_match_all`: the share of `answers` that occur in `output`, ignoring case.
pub fn score(output: &str, answers: &[String]) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    let out = output.to_lowercase();
    answers.iter().filter(|a| out.contains(&a.to_lowercase())).count() as f64 / answers.len() as f64
}

/// splitmix64: the generator's only source of randomness.
struct Rng(u64);

impl Rng {
    fn new(parts: &[u64]) -> Self {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for &p in parts {
            s = mix(s ^ mix(p.wrapping_add(0x632b_e59b_d9b4_e019)));
        }
        Rng(s)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hash_str(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The prose haystacks come from: sentences and a vocabulary of plain words.
pub struct Haystack {
    sentences: Vec<String>,
    words: Vec<String>,
}

/// Filler for the haystacks RULER makes of repeated sentences (ours, not RULER's).
const FILLER: &str = "The river runs on toward the sea. The hills stay green and quiet. \
    The road goes over the bridge and back. A bird sings somewhere in the trees.";

impl Haystack {
    /// From documents' texts: sentences (split after `.`, `?`, `!`) and the lowercase
    /// alphabetic words of 4-10 letters, each once, in order of first appearance.
    pub fn new<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut sentences = Vec::new();
        let mut words = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for text in texts {
            let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let mut start = 0;
            let bytes = text.as_bytes();
            for (i, &b) in bytes.iter().enumerate() {
                if matches!(b, b'.' | b'?' | b'!') && bytes.get(i + 1).is_none_or(|&n| n == b' ') {
                    let s = text[start..=i].trim();
                    if s.len() > 1 {
                        sentences.push(s.to_string());
                    }
                    start = i + 1;
                }
            }
            for w in text.split(|c: char| !c.is_ascii_alphabetic()) {
                if (4..=10).contains(&w.len())
                    && w.chars().all(|c| c.is_ascii_lowercase())
                    && seen.insert(w.to_string())
                {
                    words.push(w.to_string());
                }
            }
        }
        Self { sentences, words }
    }

    pub fn is_empty(&self) -> bool {
        self.sentences.is_empty() || self.words.len() < 64
    }
}

/// The kinds of value a needle carries.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Number,
    Uuid,
    Word,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Number => "numbers",
            Kind::Uuid => "uuids",
            Kind::Word => "words",
        }
    }
}

struct Draw<'a> {
    rng: Rng,
    hay: &'a Haystack,
}

impl Draw<'_> {
    fn value(&mut self, kind: Kind) -> String {
        match kind {
            Kind::Number => (1_000_000 + self.rng.below(9_000_000)).to_string(),
            Kind::Uuid => {
                let h = |r: &mut Rng, n: usize| {
                    (0..n).map(|_| char::from_digit(r.below(16) as u32, 16).unwrap()).collect::<String>()
                };
                format!(
                    "{}-{}-{}-{}-{}",
                    h(&mut self.rng, 8),
                    h(&mut self.rng, 4),
                    h(&mut self.rng, 4),
                    h(&mut self.rng, 4),
                    h(&mut self.rng, 12)
                )
            }
            Kind::Word => {
                let w = &self.hay.words;
                format!("{}-{}", w[self.rng.below(w.len())], w[self.rng.below(w.len())])
            }
        }
    }
    /// `n` distinct values.
    fn distinct(&mut self, kind: Kind, n: usize) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        while v.len() < n {
            let x = self.value(kind);
            if !v.contains(&x) {
                v.push(x);
            }
        }
        v
    }
}

/// Counts a text's tokens (the model's tokenizer).
pub type TokenCount<'a> = &'a dyn Fn(&str) -> usize;

/// Generate the case `sample` of `task` sized to `length` tokens of the whole prompt (
/// `overhead` tokens of it are the chat template's, counted by the caller), from `seed`.
pub fn generate(
    task: RulerTask,
    length: usize,
    sample: usize,
    seed: u64,
    overhead: usize,
    hay: &Haystack,
    count: TokenCount,
) -> Result<RulerCase, String> {
    if hay.is_empty() {
        return Err("RULER haystacks need documents with prose (at least 64 distinct words)".into());
    }
    let mut d = Draw { rng: Rng::new(&[hash_str(task.name()), length as u64, sample as u64, seed]), hay };
    let id = format!("{}@{length}#{sample}", task.name());
    let mut case = match task {
        RulerTask::Vt => variable_tracking(&mut d),
        RulerTask::Cwe => common_words(&mut d),
        RulerTask::Fwe => frequent_words(&mut d),
        _ => niah(task, &mut d),
    };
    case.id = id;
    case.task = task.name().to_string();
    case.length = length;
    case.max_new_tokens = task.answer_tokens();
    let fixed = count(&format!("{}\n\n\n\n{}{}", case.instruction, case.question, case.answer_prefix)) + overhead;
    let room = length.checked_sub(fixed).filter(|&r| r >= 64).ok_or_else(|| {
        format!("a {length}-token {} case leaves no room for its context ({fixed} tokens of instructions)", task.name())
    })?;
    fill(task, &mut case, &mut d, room, count);
    Ok(case)
}

/// A needle-in-a-haystack case before its haystack is filled: the needles are in `context`,
/// one per line, to be spread through the haystack by [`fill`].
fn niah(task: RulerTask, d: &mut Draw) -> RulerCase {
    use RulerTask::*;
    let (key_kind, value_kind) = match task {
        NiahSingle3 => (Kind::Word, Kind::Uuid),
        NiahMultikey3 => (Kind::Uuid, Kind::Uuid),
        _ => (Kind::Word, Kind::Number),
    };
    let (n_keys, n_values, n_queries) = match task {
        NiahMultikey1 => (4, 1, 1),
        NiahMultivalue => (1, 4, 1),
        NiahMultiquery => (4, 1, 4),
        _ => (1, 1, 1),
    };
    let keys = d.distinct(key_kind, n_keys);
    let mut needles = Vec::new();
    let mut answers = Vec::new();
    for (ki, key) in keys.iter().enumerate() {
        let values = d.distinct(value_kind, n_values);
        for v in &values {
            needles.push(needle_sentence(value_kind, key, v));
        }
        if ki < n_queries {
            answers.extend(values);
        }
    }
    d.rng.shuffle(&mut needles);
    let queried: Vec<&String> = keys.iter().take(n_queries).collect();
    let plural = value_kind.plural();
    let query = match queried.len() {
        1 => queried[0].clone(),
        _ => {
            let (last, rest) = queried.split_last().expect("several keys");
            format!("{} and {last}", rest.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", "))
        }
    };
    RulerCase {
        id: String::new(),
        task: String::new(),
        length: 0,
        instruction: format!(
            "A text follows in which some special magic {plural} are hidden. Memorise them: you will be asked about \
             these {plural} afterwards."
        ),
        context: needles.join("\n"),
        question: format!("Which special magic {plural} does the text above give for {query}? List all of them."),
        answer_prefix: format!("The special magic {plural} for {query} given in the text are:"),
        answers,
        max_new_tokens: 0,
    }
}

fn needle_sentence(kind: Kind, key: &str, value: &str) -> String {
    let one = match kind {
        Kind::Number => "number",
        Kind::Uuid => "uuid",
        Kind::Word => "word",
    };
    format!("One of the special magic {}s for {key} is: {value}.", one)
}

/// Variable tracking: `VAR A = 12345.` then `VAR B = VAR A.` three more times, the lines
/// spread through filler; every name holding the value is the answer.
fn variable_tracking(d: &mut Draw) -> RulerCase {
    let mut names: Vec<String> = Vec::new();
    while names.len() < 5 {
        let n: String = (0..5).map(|_| (b'A' + d.rng.below(26) as u8) as char).collect();
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let value = (10_000 + d.rng.below(90_000)).to_string();
    let mut lines = vec![format!("VAR {} = {value}.", names[0])];
    for w in names.windows(2) {
        lines.push(format!("VAR {} = VAR {}.", w[1], w[0]));
    }
    RulerCase {
        id: String::new(),
        task: String::new(),
        length: 0,
        instruction: "Memorise every variable assignment in the text below and follow each chain of them.".into(),
        context: lines.join("\n"),
        question: format!("Which variables in the text above end up holding the value {value}? Name all of them."),
        answer_prefix: format!("Following the assignments in the text, the variables holding the value {value} are:"),
        answers: names,
        max_new_tokens: 0,
    }
}

/// Common words: ten words 30 times each and the rest of the list words 3 times each (the
/// list's length is set by [`fill`]); the ten are the answer.
fn common_words(d: &mut Draw) -> RulerCase {
    let words = &d.hay.words;
    let mut pool: Vec<usize> = (0..words.len()).collect();
    d.rng.shuffle(&mut pool);
    let common: Vec<String> = pool[..10].iter().map(|&i| words[i].clone()).collect();
    RulerCase {
        id: String::new(),
        task: String::new(),
        length: 0,
        instruction: "Below is a numbered list of words. Some of them appear far more often than the others.".into(),
        context: String::new(),
        question: "What are the 10 words that appear most often in the list above?".into(),
        answer_prefix: "The 10 words that appear most often in the list are:".into(),
        answers: common,
        max_new_tokens: 0,
    }
}

/// Frequent words: coded words (random letters) drawn from a Zipf law with alpha 2; the three
/// most frequent are the answer (set by [`fill`], which draws the text).
fn frequent_words(_d: &mut Draw) -> RulerCase {
    RulerCase {
        id: String::new(),
        task: String::new(),
        length: 0,
        instruction: "Below is a text of coded words. Count how often each coded word occurs.".into(),
        context: String::new(),
        question: "What are the three coded words that occur most often in the text above?".into(),
        answer_prefix: "The three coded words that occur most often are:".into(),
        answers: Vec::new(),
        max_new_tokens: 0,
    }
}

/// Fill `case.context` up to `room` tokens with its haystack, the needles spread at random
/// depths between its sentences.
fn fill(task: RulerTask, case: &mut RulerCase, d: &mut Draw, room: usize, count: TokenCount) {
    use RulerTask::*;
    match task {
        Cwe => fill_common_words(case, d, room, count),
        Fwe => fill_frequent_words(case, d, room, count),
        _ => {
            let needles: Vec<String> = case.context.lines().map(str::to_string).collect();
            let needle_tokens: usize = needles.iter().map(|n| count(n) + 1).sum();
            let budget = room.saturating_sub(needle_tokens);
            let filler: Vec<String> = match task {
                NiahSingle1 | Vt => sentences_of(FILLER),
                NiahMultikey2 | NiahMultikey3 => {
                    let kind = if task == NiahMultikey3 { Kind::Uuid } else { Kind::Number };
                    let key_kind = if task == NiahMultikey3 { Kind::Uuid } else { Kind::Word };
                    // Distractor needles: other keys, other values.
                    let mut distractors = Vec::new();
                    while distractors.len() < budget / 8 + 8 {
                        let key = d.value(key_kind);
                        if !needles.iter().any(|n| n.contains(&format!(" for {key} is"))) {
                            distractors.push(needle_sentence(kind, &key, &d.value(kind)));
                        }
                    }
                    distractors
                }
                _ => {
                    let start = d.rng.below(d.hay.sentences.len());
                    (0..d.hay.sentences.len())
                        .map(|i| d.hay.sentences[(start + i) % d.hay.sentences.len()].clone())
                        .collect()
                }
            };
            // Sentences counted one by one overestimate the joined text a little: the budget is
            // rescaled by what the joined text measured (twice at most).
            let costs: Vec<usize> = filler.iter().map(|s| count(s) + 1).collect();
            let take = |budget: usize| -> usize {
                let mut used = 0;
                let mut n = 0;
                while n < filler.len() * 10_000 {
                    let t = costs[n % filler.len()];
                    if used + t > budget {
                        break;
                    }
                    used += t;
                    n += 1;
                }
                n
            };
            let joined = |n: usize| (0..n).map(|i| filler[i % filler.len()].as_str()).collect::<Vec<_>>().join(" ");
            let mut n = take(budget);
            for _ in 0..2 {
                let measured = count(&joined(n)).max(1);
                if measured >= budget * 97 / 100 {
                    break;
                }
                n = take(budget * budget / measured);
            }
            let mut body: Vec<String> = (0..n).map(|i| filler[i % filler.len()].clone()).collect();
            for n in needles {
                let at = d.rng.below(body.len() + 1);
                body.insert(at, n);
            }
            case.context = body.join(" ");
            // Estimates add per sentence; the joined text may tokenise a little longer.
            while count(&case.context) > room && body.len() > 1 {
                let last = body.iter().rposition(|s| !case.answers.iter().any(|a| s.contains(a.as_str())));
                match last {
                    Some(i) => {
                        body.remove(i);
                    }
                    None => break,
                }
                case.context = body.join(" ");
            }
        }
    }
}

fn sentences_of(text: &str) -> Vec<String> {
    Haystack::new([text]).sentences
}

fn fill_common_words(case: &mut RulerCase, d: &mut Draw, room: usize, count: TokenCount) {
    let words = &d.hay.words;
    let common = case.answers.clone();
    let rare_pool: Vec<&String> = words.iter().filter(|w| !common.contains(w)).collect();
    // Common words 30 times each (fewer when a short prompt cannot hold 300 of them, but more
    // often than the rare words' 3), then as many rare words as fit.
    let render = |repeats: usize, rare: &[&String], rng: &mut Rng| -> String {
        let mut list: Vec<&str> = Vec::new();
        for w in &common {
            list.extend(std::iter::repeat_n(w.as_str(), repeats));
        }
        for w in rare {
            list.extend(std::iter::repeat_n(w.as_str(), 3));
        }
        rng.shuffle(&mut list);
        list.iter().enumerate().map(|(i, w)| format!("{}. {w}", i + 1)).collect::<Vec<_>>().join(" ")
    };
    let repeats = (5..=30).rev().find(|&r| count(&render(r, &[], &mut Rng(d.rng.0))) <= room).unwrap_or(5);
    let mut order: Vec<usize> = (0..rare_pool.len()).collect();
    d.rng.shuffle(&mut order);
    let (mut lo, mut hi) = (0usize, order.len());
    // The largest number of rare words whose list fits.
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        let rare: Vec<&String> = order[..mid].iter().map(|&i| rare_pool[i]).collect();
        let mut probe = Rng(d.rng.0);
        if count(&render(repeats, &rare, &mut probe)) <= room {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let rare: Vec<&String> = order[..lo].iter().map(|&i| rare_pool[i]).collect();
    case.context = render(repeats, &rare, &mut d.rng);
}

fn fill_frequent_words(case: &mut RulerCase, d: &mut Draw, room: usize, count: TokenCount) {
    // A vocabulary of coded words, ranked; rank r drawn with probability ~ 1 / r^2.
    let mut vocab: Vec<String> = Vec::new();
    while vocab.len() < 400 {
        let len = 4 + d.rng.below(3);
        let w: String = (0..len).map(|_| (b'a' + d.rng.below(26) as u8) as char).collect();
        if !vocab.contains(&w) {
            vocab.push(w);
        }
    }
    let weights: Vec<f64> = (1..=vocab.len()).map(|r| 1.0 / (r as f64).powi(2)).collect();
    let total: f64 = weights.iter().sum();
    let mut words: Vec<usize> = Vec::new();
    let mut text = String::new();
    let mut per_token = 3usize;
    loop {
        // Draw in batches sized by the tokens a word has taken so far.
        let batch = (room.saturating_sub(count(&text)) / per_token).max(1);
        for _ in 0..batch {
            let mut u = d.rng.unit() * total;
            let mut r = 0;
            while r + 1 < weights.len() && u >= weights[r] {
                u -= weights[r];
                r += 1;
            }
            words.push(r);
        }
        let candidate = words.iter().map(|&r| vocab[r].as_str()).collect::<Vec<_>>().join(" ");
        let n = count(&candidate);
        if n > room {
            // Drop the batch's excess a word at a time.
            while !words.is_empty()
                && count(&words.iter().map(|&r| vocab[r].as_str()).collect::<Vec<_>>().join(" ")) > room
            {
                let cut = (words.len() / 50).max(1);
                words.truncate(words.len() - cut);
            }
            break;
        }
        text = candidate;
        per_token = (n / words.len().max(1)).max(1);
        if room - n < 8 {
            break;
        }
    }
    case.context = words.iter().map(|&r| vocab[r].as_str()).collect::<Vec<_>>().join(" ");
    let mut freq = vec![0usize; vocab.len()];
    words.iter().for_each(|&r| freq[r] += 1);
    let mut ranked: Vec<usize> = (0..vocab.len()).collect();
    ranked.sort_by(|&a, &b| freq[b].cmp(&freq[a]).then(a.cmp(&b)));
    case.answers = ranked[..3].iter().map(|&r| vocab[r].clone()).collect();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hay() -> Haystack {
        let text = "The quick brown foxes jumped over lazy dogs near seven rivers. Mountains stood silent \
                    beyond distant valleys. Travellers carried heavy bundles across narrow bridges! Farmers \
                    planted barley while shepherds watched grazing sheep? Merchants traded copper, silver, \
                    spices and woolen cloth in crowded markets. Children played quietly under ancient \
                    willow trees beside clear streams. Sailors mended torn canvas before evening storms \
                    arrived from western waters. Weavers, potters, bakers, masons, smiths and tanners all \
                    worked through long winter nights.";
        Haystack::new([text])
    }

    /// A whitespace word counter stands in for a tokenizer.
    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    #[test]
    fn scoring_is_the_share_of_answers_found_ignoring_case() {
        let a = vec!["1234567".to_string(), "Alpha-Beta".to_string()];
        assert_eq!(score("the numbers are 1234567 and alpha-beta.", &a), 1.0);
        assert_eq!(score("only 1234567", &a), 0.5);
        assert_eq!(score("123456", &a), 0.0);
        assert_eq!(score("anything", &[]), 0.0);
    }

    #[test]
    fn cases_are_deterministic_sized_and_hold_their_answers() {
        let h = hay();
        for task in RulerTask::ALL {
            let a = generate(task, 600, 0, 7, 10, &h, &words).unwrap();
            let b = generate(task, 600, 0, 7, 10, &h, &words).unwrap();
            assert_eq!(a, b, "{}: not deterministic", task.name());
            let c = generate(task, 600, 1, 7, 10, &h, &words).unwrap();
            assert_ne!(a.context, c.context, "{}: samples should differ", task.name());
            let total =
                words(&format!("{}\n\n\n\n{}{}", a.instruction, a.question, a.answer_prefix)) + 10 + words(&a.context);
            assert!(total <= 600 && total >= 500, "{}: {total} words for 600", task.name());
            assert!(!a.answers.is_empty());
            for ans in &a.answers {
                assert!(a.context.contains(ans.as_str()), "{}: answer {ans} not in the context", task.name());
            }
            assert_eq!(score(&a.answers.join(" "), &a.answers), 1.0);
        }
    }

    #[test]
    fn the_tasks_have_ruler_s_structure() {
        let h = hay();
        let g = |t| generate(t, 800, 0, 1, 0, &h, &words).unwrap();
        assert_eq!(g(RulerTask::NiahSingle2).answers.len(), 1);
        assert_eq!(g(RulerTask::NiahMultikey1).context.matches("special magic numbers for").count(), 4);
        assert_eq!(g(RulerTask::NiahMultivalue).answers.len(), 4);
        let mq = g(RulerTask::NiahMultiquery);
        assert_eq!(mq.answers.len(), 4);
        let uuid = &g(RulerTask::NiahSingle3).answers[0];
        assert_eq!(uuid.len(), 36);
        assert_eq!(uuid.matches('-').count(), 4);
        // Multi-key 2's haystack is needles only.
        let mk2 = g(RulerTask::NiahMultikey2);
        assert!(mk2.context.matches("special magic numbers for").count() > 10);
        // Variable tracking: five names, a chain.
        let vt = g(RulerTask::Vt);
        assert_eq!(vt.answers.len(), 5);
        for w in vt.answers.windows(2) {
            assert!(vt.context.contains(&format!("VAR {} = VAR {}.", w[1], w[0])));
        }
        // Common words: each answer 30 times (at this length), every other word 3 times.
        let cwe = generate(RulerTask::Cwe, 1200, 0, 1, 0, &h, &words).unwrap();
        let items: Vec<&str> = cwe.context.split(' ').filter(|w| !w.ends_with('.')).collect();
        for a in &cwe.answers {
            assert_eq!(items.iter().filter(|w| **w == a.as_str()).count(), 30, "{a}");
        }
        let rare = items.iter().find(|w| !cwe.answers.iter().any(|a| a == *w)).unwrap();
        assert_eq!(items.iter().filter(|w| *w == rare).count(), 3);
        // Frequent words: the answers are the three most frequent, in order.
        let fwe = g(RulerTask::Fwe);
        let mut freq = std::collections::HashMap::new();
        fwe.context.split(' ').for_each(|w| *freq.entry(w).or_insert(0) += 1);
        let top = freq[fwe.answers[0].as_str()];
        assert!(freq.values().all(|&n| n <= top));
        assert!(
            freq[fwe.answers[2].as_str()]
                >= freq.values().filter(|&&n| n < freq[fwe.answers[2].as_str()]).copied().max().unwrap_or(0)
        );
    }

    #[test]
    fn too_short_a_length_is_an_error() {
        assert!(generate(RulerTask::NiahSingle2, 40, 0, 0, 0, &hay(), &words).unwrap_err().contains("no room"));
        assert!(generate(RulerTask::Vt, 500, 0, 0, 0, &Haystack::new(["Too short."]), &words).is_err());
        assert!("niah_x".parse::<RulerTask>().unwrap_err().contains("niah_single_1"));
    }
}
