//! Eviction policies: which cached tokens a (sequence, layer, KV head) keeps within its budget.
//!
//! Plain Rust over [`SlotTable`]s and per-slot scores; the attention kernel feeds the scores
//! ([`Signal`] says what it must compute) and the backend frees the slots chosen here.
//!
//! Keyformer is the spec's Algorithm 1: the score of a cached token accumulates
//! `softmax((x + g) / tau)` over steps, `x` the scaled attention logits of the KV head's query
//! heads, `g` reproducible noise ([`crate::noise`]), `tau` rising linearly from `tau_init` to
//! `tau_end` over the tokens to generate. Each step the `recent` most recent tokens stay and
//! the lowest-scored candidate goes, re-selected every step. The baselines (H2O, TOVA, SnapKV,
//! StreamingLLM sinks, window, random, key norm) share the same machinery.
//!
//! Ties: among equal scores the OLDEST token (lowest position) is evicted first.

use crate::expected::QueryModel;
use crate::noise::{self, NoiseKind};
use crate::SlotTable;

/// Errors in policy settings.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "unknown KV policy '{0}' (full, window, sink, h2o, tova, snapkv, random, knorm, expected, kvzip, keyformer, keyformer-long, kvzip-global)"
    )]
    UnknownPolicy(String),
    #[error("invalid amount '{0}': give a token count (64) or a percentage (50%)")]
    BadAmount(String),
    #[error("the KV budget must be at least 1 token (got {0})")]
    ZeroBudget(String),
    #[error("the recent window ({recent} tokens) is larger than the KV budget ({budget} tokens)")]
    RecentOverBudget { recent: usize, budget: usize },
    #[error("{0}")]
    Invalid(String),
}

/// The policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    Full,
    Window,
    Sink,
    H2o,
    Tova,
    SnapKv,
    Random,
    KNorm,
    /// kvpress's ExpectedAttention: the attention the queries to come are expected to pay
    /// ([`crate::expected`]), times the value's norm; CPU only for now.
    Expected,
    /// KVzip (Kim et al., 2025): at the prompt's end the model is asked to repeat the prompt
    /// and reads it again, teacher-forced; each prompt token's score is the most attention any
    /// query of that repetition pays it ([`Signal::Reconstruction`]). Query-agnostic: it keeps
    /// what the model needs to reproduce the context. CPU only for now.
    Kvzip,
    Keyformer,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 11] = [
        PolicyKind::Full,
        PolicyKind::Window,
        PolicyKind::Sink,
        PolicyKind::H2o,
        PolicyKind::Tova,
        PolicyKind::SnapKv,
        PolicyKind::Random,
        PolicyKind::KNorm,
        PolicyKind::Expected,
        PolicyKind::Kvzip,
        PolicyKind::Keyformer,
    ];
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Full => "full",
            PolicyKind::Window => "window",
            PolicyKind::Sink => "sink",
            PolicyKind::H2o => "h2o",
            PolicyKind::Tova => "tova",
            PolicyKind::SnapKv => "snapkv",
            PolicyKind::Random => "random",
            PolicyKind::KNorm => "knorm",
            PolicyKind::Expected => "expected",
            PolicyKind::Kvzip => "kvzip",
            PolicyKind::Keyformer => "keyformer",
        }
    }
}

/// Named combinations of a policy and its settings, spelled out where a policy is parsed (a
/// preset may be followed by more settings, which apply after its own).
///
/// `keyformer-long`: Keyformer with 70% of the budget as its recent window (the paper's
/// default is 30%) and its score times each key's distance from the mean key (KeyDiff), the
/// best Keyformer variant found on RULER-style tasks at 4,096 tokens with the question asked
/// after compression: on Qwen2.5-Coder-0.5B over 33 cases 33.0 / 42.4 at 25% / 50% kept
/// against the paper's Keyformer 15.7 / 33.0 (the recent window +12.3 / +5.3, KeyDiff a
/// further +4.9 / +4.0, paired), but under TOVA with the same window (38.9 / 51.6) and TOVA
/// with KeyDiff (36.5 / 52.5) (docs/results.md). KeyDiff runs on the CPU only for now.
///
/// `kvzip-global`: KVzip's repetition scores with one budget for the whole model (spread over
/// every layer's heads by score, as kvpress's press does) and the default 30% recent window
/// (which kvpress's press has not): the best policy measured on those tasks, on
/// Qwen2.5-Coder-0.5B 92.7 / 90.5 at 25% / 50% kept over 11 cases (the full cache 90.5), on
/// the 1.5B 74.5 / 85.0 (full 85.0), where TOVA scores 44.1 / 46.4 and 39.1 / 48.2 and kvpress's
/// own KVzip (`kvzip:recent=0:layers=global`) 79.5 / 90.5 and 74.5 / 76.8 (docs/results.md).
/// CPU only for now.
pub const PRESETS: [(&str, &str); 2] =
    [("keyformer-long", "keyformer:recent=70%:keydiff"), ("kvzip-global", "kvzip:layers=global")];

impl std::str::FromStr for PolicyKind {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        PolicyKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| PolicyError::UnknownPolicy(s.into()))
    }
}

/// A token count or a percentage of something (the prompt for budgets, the budget for the
/// recent window).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    Tokens(usize),
    Percent(f64),
}

impl std::str::FromStr for Amount {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            match p.trim().parse::<f64>() {
                // Over 100% is allowed: a budget covering the prompt keeps it whole.
                Ok(v) if v.is_finite() && v >= 0.0 => Ok(Amount::Percent(v)),
                _ => Err(PolicyError::BadAmount(s.into())),
            }
        } else {
            t.parse::<usize>().map(Amount::Tokens).map_err(|_| PolicyError::BadAmount(s.into()))
        }
    }
}

/// As written on the command line: `64` or `50%`.
impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Tokens(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Amount {
    /// Tokens this amount means out of `of` (percentages round to the nearest token).
    pub fn resolve(self, of: usize) -> usize {
        match self {
            Amount::Tokens(n) => n,
            Amount::Percent(p) => (of as f64 * p / 100.0).round() as usize,
        }
    }
}

/// Keyformer's own settings (spec defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyformerOptions {
    pub tau_init: f32,
    pub tau_end: f32,
    pub noise: NoiseKind,
    /// Reproduce the reference code: key tokens fixed after the prompt, only the window slides.
    pub frozen: bool,
}

impl Default for KeyformerOptions {
    fn default() -> Self {
        Self { tau_init: 1.0, tau_end: 2.0, noise: NoiseKind::Gumbel, frozen: false }
    }
}

/// How a running sum of attention (H2O's, Keyformer's) becomes a token's eviction score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accumulate {
    /// The sum over every query that saw the token (H2O, the paper's Keyformer): an old token
    /// has been seen by more queries, so it outscores a newer one that is attended as much.
    #[default]
    Sum,
    /// The sum divided by the number of queries that saw it (every query at or after its
    /// position): the mean attention it received, fair between old and new tokens.
    Mean,
}

impl std::str::FromStr for Accumulate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sum" => Ok(Accumulate::Sum),
            "mean" => Ok(Accumulate::Mean),
            _ => Err(format!("accumulate is sum or mean, not '{s}'")),
        }
    }
}

/// How the budget is spread over layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerBudgets {
    /// Every layer keeps the budget.
    #[default]
    Uniform,
    /// PyramidKV's schedule: from 1.5x the budget at the first layer down to 0.5x at the last,
    /// linearly (the same total), since lower layers spread their attention wider.
    Pyramid,
    /// One budget for the whole model (KVzip's, kvpress's default for `KVzipPress`): at the
    /// end of the prompt the budget x layers x KV heads key tokens go to the best-scored
    /// tokens of every head of every layer together, each head keeping only its recent window
    /// and pinned sinks for sure. Meant for scores comparable across layers (KVzip's
    /// probabilities); the total memory is unchanged.
    Global,
}

impl std::str::FromStr for LayerBudgets {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uniform" => Ok(LayerBudgets::Uniform),
            "pyramid" => Ok(LayerBudgets::Pyramid),
            "global" => Ok(LayerBudgets::Global),
            _ => Err(format!("layers is uniform, pyramid or global, not '{s}'")),
        }
    }
}

/// AdaKV's safeguard: with adaptive head budgets each head keeps at least this share of its
/// uniform share of key tokens.
pub const ADAPTIVE_FLOOR: f64 = 0.2;

/// Everything a user sets about KV compression.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    pub kind: PolicyKind,
    /// Tokens per (sequence, layer, KV head); a percentage is of the prompt. `None`: no limit.
    pub budget: Option<Amount>,
    /// Recent window; a percentage is of the budget. `None`: 30% of the budget.
    pub recent: Option<Amount>,
    /// The fewest tokens a PERCENTAGE budget resolves to: half of a 20-token chat is too little
    /// context to answer from. A budget in tokens is taken as given.
    pub min_budget: usize,
    /// StreamingLLM's attention sinks.
    pub sinks: usize,
    /// The first tokens every other policy keeps too (`sinks=N` on any policy but `sink`,
    /// whose own are `sinks`); counted in the budget.
    pub pinned_sinks: usize,
    /// How H2O's and Keyformer's running sums score a token.
    pub accumulate: Accumulate,
    /// Scores of attention-based policies multiplied by the norm of the token's value: a token
    /// attended to but carrying a small value changes the output little.
    pub value_weighted: bool,
    /// The budget per layer.
    pub layer_budgets: LayerBudgets,
    /// Scores times each key's distance from its head's mean key direction (1 - cosine), the
    /// mean taken over the prompt's keys at its end: keys like every other key carry little
    /// that the rest do not (KeyDiff's observation), so they go first.
    pub key_diversity: bool,
    /// Compress the prompt only: tokens after it join without eviction (kvpress's protocol:
    /// the context is compressed, the question and the answer are added to what it kept), so
    /// the cache holds the budget plus the generated tokens.
    pub grow: bool,
    /// AdaKV: at the end of the prompt a layer's budget (budget x KV heads) goes to the
    /// best-scored tokens of all its heads together, each head keeping its recent window, its
    /// pinned sinks and at least [`ADAPTIVE_FLOOR`] of its share; the heads then keep their
    /// counts while decoding. The layer's memory is unchanged.
    pub adaptive: bool,
    /// SnapKV's observation window (last queries of the prompt).
    pub snapkv_window: usize,
    /// Compress the prompt as it goes (`chunk=N`, `--prefill-chunk N`): after every N prompt
    /// tokens the cache is trimmed to the budget, so a (layer, KV head) never holds more than
    /// budget + N tokens however long the prompt. Scores carry over between chunks (H2O's and
    /// Keyformer's sums accumulate; TOVA and SnapKV use each chunk's last queries). `None`: the
    /// whole prompt with the full cache, then one trim (the paper's method).
    pub prefill_chunk: Option<usize>,
    /// H2O's and Keyformer's accumulated score plus, at the prompt's end (and at each chunk's
    /// end when it is trimmed chunk by chunk), the plain attention of its last N queries (a
    /// SnapKV-style observation window), scaled to the same total mass (`observe=N`): the
    /// sums say what the whole prompt used, the window what its end still looks at.
    pub observe: Option<usize>,
    /// Keyformer's regularisation on a prompt-end score (`expected:gumbel`, `kvzip:gumbel`):
    /// the softmax of expected attention's logits, or of the repetition's, plus the noise of
    /// `keyformer.noise` (Gumbel by default), over the temperature `keyformer.tau_init`,
    /// seeded as Keyformer's.
    pub noisy_scores: bool,
    pub keyformer: KeyformerOptions,
    pub seed: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            kind: PolicyKind::Full,
            budget: None,
            recent: None,
            min_budget: DEFAULT_MIN_BUDGET,
            sinks: 4,
            pinned_sinks: 0,
            accumulate: Accumulate::Sum,
            value_weighted: false,
            layer_budgets: LayerBudgets::Uniform,
            adaptive: false,
            grow: false,
            key_diversity: false,
            snapkv_window: 32,
            prefill_chunk: None,
            observe: None,
            noisy_scores: false,
            keyformer: KeyformerOptions::default(),
            seed: 0,
        }
    }
}

/// SnapKV's pooling kernel over the observation scores (kvpress and SnapKV use 5-7).
pub const SNAPKV_KERNEL: usize = 7;
/// The default recent window, as a fraction of the budget (the reference code's 30%).
pub const DEFAULT_RECENT_PERCENT: f64 = 30.0;
/// The default floor of a percentage budget, in tokens (`PolicyConfig::min_budget`). Below
/// about this many tokens a 135M-1.5B model's answers fall apart (a 50% budget on a 31-token
/// chat gave garbled text); a prompt shorter than the floor is not compressed at all.
pub const DEFAULT_MIN_BUDGET: usize = 64;

impl PolicyConfig {
    /// A policy as written on the command line, in a server request or in `eval --policies`,
    /// with its own settings after colons: `keyformer`, `keyformer:noise=none`,
    /// `keyformer:recent=10%:frozen`, `sink:sinks=8`, `h2o:budget=256`. Options: `budget=AMOUNT`,
    /// `min-budget=N`, `recent=AMOUNT`, `sinks=N` (StreamingLLM's; on any other policy, the
    /// first N tokens pinned), `window=N` (SnapKV's observation window), `accumulate=sum|mean`
    /// (H2O's and Keyformer's running sums, or their mean per observing query), `value` (scores
    /// weighted by the value's norm), `layers=uniform|pyramid|global` (the budget per layer,
    /// or one for the whole model), `adaptive` (AdaKV's budgets per head), `grow` (only the
    /// prompt is compressed), `keydiff` (scores times each key's distance from the mean key),
    /// `observe=N` (H2O's and Keyformer's sums plus the attention of the prompt's last N
    /// queries), `gumbel` (expected attention's or KVzip's softmax with Keyformer's noise and temperature),
    /// `noise=gumbel|gaussian|constant|none`,
    /// `tau=INIT-END`, `frozen`. Unset options come from `defaults` (whose kind is replaced).
    /// The kinds: full, window, sink, h2o, tova, snapkv, random, knorm, expected, kvzip, keyformer.
    pub fn parse_spec(spec: &str, defaults: &PolicyConfig) -> Result<PolicyConfig, PolicyError> {
        let (head, rest) = spec.trim().split_once(':').unwrap_or((spec.trim(), ""));
        if let Some((_, expansion)) = PRESETS.iter().find(|(name, _)| *name == head.trim()) {
            let expanded = if rest.is_empty() { expansion.to_string() } else { format!("{expansion}:{rest}") };
            return Self::parse_spec(&expanded, defaults);
        }
        let mut parts = spec.trim().split(':');
        let kind: PolicyKind = parts.next().unwrap_or_default().trim().parse()?;
        let mut config = PolicyConfig { kind, ..defaults.clone() };
        if kind == PolicyKind::Full {
            config.budget = None;
        }
        for option in parts {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            let bad = |what: String| PolicyError::Invalid(format!("policy '{spec}': {what}"));
            let count = |name: &str| {
                value.parse::<usize>().map_err(|_| bad(format!("{name} must be a token count, not '{value}'")))
            };
            match key.trim() {
                "budget" => config.budget = Some(value.parse().map_err(|e: PolicyError| bad(e.to_string()))?),
                "min-budget" => config.min_budget = count("min-budget")?,
                "recent" => config.recent = Some(value.parse().map_err(|e: PolicyError| bad(e.to_string()))?),
                "sinks" if kind == PolicyKind::Sink => config.sinks = count("sinks")?,
                "sinks" => config.pinned_sinks = count("sinks")?,
                "accumulate" => config.accumulate = value.parse().map_err(bad)?,
                "value" if value.is_empty() => config.value_weighted = true,
                "layers" => config.layer_budgets = value.parse().map_err(bad)?,
                "adaptive" if value.is_empty() => config.adaptive = true,
                "grow" if value.is_empty() => config.grow = true,
                "keydiff" if value.is_empty() => config.key_diversity = true,
                "gumbel" if value.is_empty() && matches!(kind, PolicyKind::Expected | PolicyKind::Kvzip) => {
                    config.noisy_scores = true
                }
                "window" => config.snapkv_window = count("window")?,
                "chunk" => config.prefill_chunk = Some(count("chunk")?),
                "observe" => config.observe = Some(count("observe")?),
                "noise" => config.keyformer.noise = value.parse::<NoiseKind>().map_err(bad)?,
                "tau" => {
                    let (a, b) = value.split_once('-').ok_or_else(|| bad("tau is INIT-END, e.g. tau=1-2".into()))?;
                    let t = |v: &str| v.parse::<f32>().map_err(|_| bad(format!("'{v}' is not a temperature")));
                    (config.keyformer.tau_init, config.keyformer.tau_end) = (t(a)?, t(b)?);
                }
                "frozen" if value.is_empty() => config.keyformer.frozen = true,
                _ => {
                    return Err(bad(format!(
                        "unknown option '{option}' (budget=, min-budget=, recent=, sinks=, window=, chunk=, observe=, \
                     accumulate=, value, layers=, adaptive, grow, keydiff, gumbel (expected, kvzip), noise=, tau=, frozen)"
                    )))
                }
            }
        }
        Ok(config)
    }

    /// A policy from its two usual settings, as `--kv-policy` and `--kv-budget` (or a server
    /// request's `kv_cache`) give them: a budget without a policy means Keyformer, a policy
    /// without a budget keeps `defaults`' budget, and the full cache refuses a budget.
    pub fn from_parts(
        policy: Option<&str>,
        budget: Option<Amount>,
        defaults: &PolicyConfig,
    ) -> Result<PolicyConfig, PolicyError> {
        let mut config = match policy {
            Some(spec) => Self::parse_spec(spec, defaults)?,
            None if budget.is_some() && defaults.kind == PolicyKind::Full => {
                PolicyConfig { kind: PolicyKind::Keyformer, ..defaults.clone() }
            }
            None => defaults.clone(),
        };
        if let Some(b) = budget {
            if config.kind == PolicyKind::Full {
                return Err(PolicyError::Invalid(format!(
                    "the full cache keeps every token: a budget ({b}) needs a policy such as keyformer"
                )));
            }
            config.budget = Some(b);
        }
        config.validate()?;
        Ok(config)
    }

    /// The policy as tables name it: `full`, or the kind and its budget (`keyformer@50%`).
    pub fn label(&self) -> String {
        match self.budget {
            Some(b) if self.kind != PolicyKind::Full => format!("{}@{b}", self.kind.name()),
            _ => self.kind.name().to_string(),
        }
    }

    /// Check the settings that do not depend on the prompt.
    pub fn validate(&self) -> Result<(), PolicyError> {
        match self.budget {
            None if self.kind != PolicyKind::Full => {
                return Err(PolicyError::Invalid(format!("policy '{}' needs a --kv-budget", self.kind.name())))
            }
            Some(Amount::Tokens(0)) => return Err(PolicyError::ZeroBudget("0".into())),
            Some(Amount::Percent(p)) if p <= 0.0 => return Err(PolicyError::ZeroBudget(format!("{p}%"))),
            _ => {}
        }
        if self.min_budget == 0 {
            return Err(PolicyError::Invalid("the minimum KV budget must be at least 1 token".into()));
        }
        if let (Some(Amount::Tokens(b)), Some(Amount::Tokens(r))) = (self.budget, self.recent) {
            if r > b {
                return Err(PolicyError::RecentOverBudget { recent: r, budget: b });
            }
        }
        let k = &self.keyformer;
        if !(k.tau_init > 0.0 && k.tau_end > 0.0 && k.tau_init.is_finite() && k.tau_end.is_finite()) {
            return Err(PolicyError::Invalid(format!(
                "temperatures must be > 0 (got {} and {})",
                k.tau_init, k.tau_end
            )));
        }
        if self.kind == PolicyKind::SnapKv && self.snapkv_window == 0 {
            return Err(PolicyError::Invalid("--snapkv-window must be at least 1".into()));
        }
        if self.prefill_chunk == Some(0) {
            return Err(PolicyError::Invalid("a prefill chunk must be at least 1 token".into()));
        }
        if self.kind == PolicyKind::Kvzip && self.prefill_chunk.is_some() {
            return Err(PolicyError::Invalid(
                "kvzip scores the whole prompt at its end (it repeats it): it cannot trim the prompt chunk by chunk"
                    .into(),
            ));
        }
        match self.observe {
            Some(0) => return Err(PolicyError::Invalid("an observation window (observe=) must be at least 1 query".into())),
            Some(_) if !matches!(self.kind, PolicyKind::H2o | PolicyKind::Keyformer) => {
                return Err(PolicyError::Invalid(format!(
                    "observe= adds to H2O's and Keyformer's accumulated scores: policy '{}' has none (snapkv scores by its window alone)",
                    self.kind.name()
                )))
            }
            _ => {}
        }
        Ok(())
    }

    /// Fix the budget for a sequence whose prompt has `prompt_len` tokens and which will take
    /// `steps` decode steps, over `n_layers` x `n_kv_heads` caches.
    pub fn resolve(
        &self,
        prompt_len: usize,
        steps: usize,
        n_layers: usize,
        n_kv_heads: usize,
    ) -> Result<SequencePolicy, PolicyError> {
        self.validate()?;
        let budget = match (self.kind, self.budget) {
            (PolicyKind::Full, _) | (_, None) => usize::MAX,
            (_, Some(b)) => {
                let k = match b {
                    Amount::Percent(_) => b.resolve(prompt_len).max(self.min_budget),
                    Amount::Tokens(_) => b.resolve(prompt_len),
                };
                if k == 0 {
                    return Err(PolicyError::ZeroBudget(format!("{b} of a {prompt_len}-token prompt")));
                }
                k
            }
        };
        let recent = match self.kind {
            PolicyKind::Full => 0,
            PolicyKind::Window => budget,
            PolicyKind::Sink => {
                if self.sinks > budget {
                    return Err(PolicyError::Invalid(format!("{} sinks do not fit a budget of {budget}", self.sinks)));
                }
                budget - self.sinks
            }
            PolicyKind::SnapKv => self.snapkv_window.min(budget),
            _ => {
                let r = self.recent.unwrap_or(Amount::Percent(DEFAULT_RECENT_PERCENT)).resolve(budget);
                if r > budget {
                    return Err(PolicyError::RecentOverBudget { recent: r, budget });
                }
                r
            }
        };
        let pins = !matches!(self.kind, PolicyKind::Full | PolicyKind::Window | PolicyKind::Sink);
        if pins && budget != usize::MAX && recent + self.pinned_sinks > budget {
            return Err(PolicyError::Invalid(format!(
                "{} pinned sinks and a recent window of {recent} do not fit a budget of {budget}",
                self.pinned_sinks
            )));
        }
        let scored = !matches!(self.kind, PolicyKind::Full | PolicyKind::Window | PolicyKind::Sink);
        if (self.adaptive || self.layer_budgets != LayerBudgets::Uniform) && !scored {
            return Err(PolicyError::Invalid(format!(
                "adaptive and layers= spread a budget by score: policy '{}' has none",
                self.kind.name()
            )));
        }
        let head_budgets = match self.layer_budgets {
            _ if budget == usize::MAX => Vec::new(),
            LayerBudgets::Uniform if !self.adaptive => Vec::new(),
            LayerBudgets::Uniform | LayerBudgets::Global => vec![budget; n_layers * n_kv_heads],
            LayerBudgets::Pyramid => pyramid(budget, n_layers, recent + self.pinned_sinks + 1, prompt_len)
                .into_iter()
                .flat_map(|b| std::iter::repeat_n(b, n_kv_heads))
                .collect(),
        };
        Ok(SequencePolicy {
            config: self.clone(),
            budget,
            head_budgets,
            recent,
            prompt_len,
            steps,
            n_kv_heads,
            scores: vec![Vec::new(); n_layers * n_kv_heads],
            value_norms: vec![Vec::new(); if self.value_weighted { n_layers * n_kv_heads } else { 0 }],
            diversity: vec![Vec::new(); if self.key_diversity { n_layers * n_kv_heads } else { 0 }],
            observed: vec![Vec::new(); if self.observe.is_some() { n_layers * n_kv_heads } else { 0 }],
            mean_keys: vec![Vec::new(); if self.key_diversity { n_layers * n_kv_heads } else { 0 }],
            query_models: vec![None; if self.kind == PolicyKind::Expected { n_layers * n_kv_heads } else { 0 }],
            step: 0,
            prompt_done: false,
            chunk_end: self.prefill_chunk.map_or(prompt_len, |c| c.min(prompt_len)),
            reconstruction: None,
        })
    }
}

/// PyramidKV's schedule: layer l keeps `budget x (1.5 - l / (n - 1))`, never below `floor`
/// nor above the prompt, and the layers together at most `n x budget`.
fn pyramid(budget: usize, n: usize, floor: usize, prompt_len: usize) -> Vec<usize> {
    if n < 2 {
        return vec![budget; n];
    }
    let cap = prompt_len.max(budget);
    let mut b: Vec<usize> = (0..n)
        .map(|l| {
            let share = budget as f64 * (1.5 - l as f64 / (n - 1) as f64);
            (share.floor() as usize).clamp(floor.min(budget), cap)
        })
        .collect();
    // Floors and caps may leave the total off `n x budget`: take from the largest layers or
    // give to the smallest until it matches (or nothing can move).
    let total = n * budget;
    while b.iter().sum::<usize>() > total {
        let (i, _) =
            b.iter().enumerate().filter(|(_, &x)| x > floor.min(budget)).max_by_key(|(_, &x)| x).unwrap_or((0, &0));
        if b[i] <= floor.min(budget) {
            break;
        }
        b[i] -= 1;
    }
    while b.iter().sum::<usize>() < total {
        let Some((i, _)) = b.iter().enumerate().filter(|(_, &x)| x < cap).min_by_key(|(_, &x)| x) else { break };
        b[i] += 1;
    }
    b
}

/// What the attention kernel must report for one layer at this step: for every query row at
/// position >= `from_position`, a per-slot row of probabilities summed over each KV head's
/// query heads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Signal {
    /// No attention-derived score.
    None,
    /// Plain softmax probabilities (the ones the output uses).
    Attention { from_position: u32 },
    /// Keyformer: `softmax((x + g) / tau)`, g drawn per (seed, layer, query head, query
    /// position, key position).
    Noisy { from_position: u32, tau: f32, noise: NoiseKind, seed: u64 },
    /// KVzip's reconstruction score: for the query rows at positions >= `from_position` (the
    /// prompt's repetition), the softmax taken over the keys at positions < `sinks`, in
    /// `first..end` (the part of the prompt being repeated) and >= `from_position` (the
    /// repetition itself); each slot in `first..end` gets the largest probability any of
    /// those rows and any query head of its KV head gives it. The rows are maxima, not sums:
    /// a kernel merges into them with `max`.
    /// With `noise`, each row's softmax is Keyformer's, `softmax((x + g) / tau)` over the same
    /// keys (`kvzip:gumbel`).
    Reconstruction { from_position: u32, first: u32, end: u32, sinks: u32, noise: Option<ScoreNoise> },
}

/// Keyformer's regularisation of a softmax: noise of `kind` drawn per (seed, layer, query head,
/// query position, key position), then the temperature `tau`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreNoise {
    pub kind: NoiseKind,
    pub tau: f32,
    pub seed: u64,
}

impl Signal {
    /// Whether rows of this signal merge by maximum (else by sum).
    pub fn merges_by_max(&self) -> bool {
        matches!(self, Signal::Reconstruction { .. })
    }
}

/// Attention sinks KVzip keeps whatever their score and counts in its softmax (kvpress's
/// `n_sink`).
pub const KVZIP_SINKS: usize = 4;

/// Per-slot score rows of one layer's KV heads, which a kernel adds to in place.
pub type ScoreRows<'a> = &'a mut [Vec<f32>];

/// The order in which spread budgets go to (eviction key, position, head index) entries: the
/// best key first, ties to the newer position, then to the earlier head (a total order, so
/// a selection picks the same set as a stable sort would).
fn best_first(a: &(f32, u32, usize), b: &(f32, u32, usize)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2))
}

/// The policy state of one sequence: its resolved budget and a score per slot of every
/// (layer, KV head).
#[derive(Debug, Clone)]
pub struct SequencePolicy {
    pub config: PolicyConfig,
    /// Tokens kept per (layer, KV head); `usize::MAX` for the full cache. With per-layer or
    /// adaptive budgets, the uniform share ([`head_budget`](Self::head_budget) is each one's).
    pub budget: usize,
    /// Per (layer, KV head) budgets when they differ (pyramid, adaptive); empty: all `budget`.
    head_budgets: Vec<usize>,
    /// Most recent tokens always kept.
    pub recent: usize,
    pub prompt_len: usize,
    /// Decode steps planned (the temperature schedule's T).
    pub steps: usize,
    n_kv_heads: usize,
    scores: Vec<Vec<f32>>,
    /// The norm of each slot's value (only with `value_weighted`).
    value_norms: Vec<Vec<f32>>,
    /// Each slot's 1 - cos(key, mean key) and each head's unit mean key (with `key_diversity`).
    diversity: Vec<Vec<f32>>,
    mean_keys: Vec<Vec<f32>>,
    /// Per (layer, KV head), the observation window's attention of the chunk being processed
    /// (only with `observe`).
    observed: Vec<Vec<f32>>,
    /// Per (layer, KV head), the model of the queries to come (expected attention), made at
    /// the prompt's end (and at each chunk's end when it is trimmed chunk by chunk).
    query_models: Vec<Option<QueryModel>>,
    step: usize,
    prompt_done: bool,
    /// Where the prompt chunk being processed ends (the prompt's length unless it is trimmed
    /// chunk by chunk): TOVA and SnapKV score with the queries just before it.
    chunk_end: usize,
    /// KVzip: the repetition being read through a copy of the cache, if any.
    reconstruction: Option<Signal>,
}

impl SequencePolicy {
    pub fn kind(&self) -> PolicyKind {
        self.config.kind
    }
    /// The tokens (layer, head) keeps.
    pub fn head_budget(&self, layer: usize, head: usize) -> usize {
        self.head_budgets.get(layer * self.n_kv_heads + head).copied().unwrap_or(self.budget)
    }

    /// The tokens `layer` keeps over all its heads.
    pub fn layer_budget(&self, layer: usize) -> usize {
        (0..self.n_kv_heads).map(|h| self.head_budget(layer, h)).fold(0usize, usize::saturating_add)
    }

    /// AdaKV's split of `layer`'s budget over its heads at the end of the prompt (`tables`: the
    /// layer's heads): each head keeps its recent window and pinned sinks, plus at least
    /// [`ADAPTIVE_FLOOR`] of its share of key tokens; the rest of the layer's key tokens go to
    /// the best eviction keys of all heads together. No-op unless `adaptive` (and not
    /// `layers=global`, which spreads over every layer at once: [`plan_global`](Self::plan_global)).
    pub fn plan_adaptive(&mut self, layer: usize, tables: &[&SlotTable]) {
        if !self.config.adaptive || self.config.layer_budgets == LayerBudgets::Global {
            return;
        }
        let heads: Vec<(usize, usize, &SlotTable)> = tables.iter().enumerate().map(|(h, t)| (layer, h, *t)).collect();
        self.spread_budget(&heads, ADAPTIVE_FLOOR);
    }

    /// `layers=global`: the budgets of `heads` (every (layer, KV head, table) that keeps a
    /// budget: not the sliding-window layers) go, at the end of the prompt, to the best
    /// eviction keys of them all together, each head keeping its recent window and pinned
    /// sinks (with `adaptive`, also AdaKV's floor). No-op otherwise.
    pub fn plan_global(&mut self, heads: &[(usize, usize, &SlotTable)]) {
        if self.config.layer_budgets != LayerBudgets::Global {
            return;
        }
        let floor = if self.config.adaptive { ADAPTIVE_FLOOR } else { 0.0 };
        self.spread_budget(heads, floor);
    }

    /// Spread the budgets of `heads` ((layer, KV head, table)) over them by eviction key: each
    /// keeps its recent window, its pinned sinks and `floor_share` of its own share of key
    /// tokens; the rest go to the best keys of all of them together (ties: the newer).
    fn spread_budget(&mut self, heads: &[(usize, usize, &SlotTable)], floor_share: f64) {
        if self.budget == usize::MAX || self.prompt_done {
            return;
        }
        let fixed = self.recent + self.pinned() as usize;
        let mut floors = Vec::with_capacity(heads.len());
        let mut pool: Vec<(f32, u32, usize)> = Vec::new(); // key, position, index in `heads`
        let (mut quota, mut shares, mut available) = (0usize, 0usize, 0usize);
        for (i, &(layer, h, table)) in heads.iter().enumerate() {
            let share = self.head_budget(layer, h).saturating_sub(fixed);
            let floor = (share as f64 * floor_share).ceil() as usize;
            quota += share.saturating_sub(floor);
            shares += share;
            floors.push(floor);
            let Some(last) = table.last_position() else { continue };
            let first_recent = (last as u64 + 1).saturating_sub(self.recent as u64);
            let mut keys: Vec<(f32, u32, usize)> = table
                .occupied()
                .filter(|&(_, p)| (p as u64) < first_recent && p as u64 >= self.pinned())
                .map(|(slot, p)| (self.eviction_key(layer, h, slot, p, last), p, i))
                .collect();
            available += keys.len();
            // The head's `floor` best go first (a selection, not a sort: a 7B model's prompt is
            // a thousand heads of thousands of keys).
            let floor = floor.min(keys.len());
            if floor < keys.len() {
                keys.select_nth_unstable_by(floor, best_first);
            }
            pool.extend_from_slice(&keys[floor..]);
        }
        if available <= shares {
            // Every key token fits: nothing to trade between heads, and each head keeps its
            // share for what decoding adds.
            return;
        }
        // Here the pool holds at least `quota` tokens, so the heads' budgets keep their sum.
        if quota < pool.len() {
            pool.select_nth_unstable_by(quota, best_first);
        }
        let mut extra = vec![0usize; heads.len()];
        for &(_, _, i) in pool.iter().take(quota) {
            extra[i] += 1;
        }
        for (i, &(layer, h, _)) in heads.iter().enumerate() {
            self.head_budgets[layer * self.n_kv_heads + h] = fixed + floors[i] + extra[i];
        }
    }

    /// Whether the prompt has been compressed (later eviction happens at every step).
    pub fn prompt_done(&self) -> bool {
        self.prompt_done
    }
    /// Slots each (layer, KV head) needs: the prompt while it is processed (budget + a chunk
    /// when it is trimmed chunk by chunk), then budget + 1 (the new token joins before one is
    /// evicted), or budget + the steps when growing.
    pub fn capacity(&self, context: usize) -> usize {
        let most = self.head_budgets.iter().copied().max().unwrap_or(self.budget);
        let prompt = self.prompt_chunk().map_or(self.prompt_len, |c| most.saturating_add(c).min(self.prompt_len));
        most.saturating_add(self.decode_room()).max(prompt).min(context.max(prompt))
    }

    /// The prompt chunk after which the cache is trimmed, when the prompt is compressed as it
    /// goes and is longer than one chunk (a policy with a budget and `prefill_chunk`).
    pub fn prompt_chunk(&self) -> Option<usize> {
        self.config.prefill_chunk.filter(|&c| self.budget != usize::MAX && c < self.prompt_len)
    }

    /// Tokens (layer, head) holds at most while the prompt is processed.
    pub fn held_during_prompt(&self, layer: usize, head: usize) -> usize {
        match self.prompt_chunk() {
            Some(c) => self.head_budget(layer, head).saturating_add(c).min(self.prompt_len),
            None => self.prompt_len,
        }
    }

    /// A finished prompt goes on with more prompt tokens (a chat's next turn, after its
    /// answer): positions up to `prompt_end` are prompt again, scored as a prompt (the scores so
    /// far carry over; SnapKV's and a frozen selection's start afresh) and trimmed at their end,
    /// and `steps` decode steps follow. The budget stays as resolved.
    pub fn reopen_prompt(&mut self, next_position: usize, prompt_end: usize, steps: usize) {
        self.prompt_done = false;
        self.prompt_len = prompt_end;
        self.steps = steps;
        self.step = 0;
        self.chunk_end = match self.config.prefill_chunk {
            Some(c) => ((next_position / c + 1) * c).min(prompt_end),
            None => prompt_end,
        };
        let kind = self.config.kind;
        if kind == PolicyKind::SnapKv || (kind == PolicyKind::Keyformer && self.config.keyformer.frozen) {
            self.scores.iter_mut().for_each(|s| s.iter_mut().for_each(|v| *v = 0.0));
        }
    }

    /// A cache kept at prompt position `at` (a shared prefix, [`reuse_key`](Self::reuse_key))
    /// goes on as the prompt of another sequence of `prompt_len` tokens and `steps` steps.
    pub fn resume_prompt(&mut self, at: usize, prompt_len: usize, steps: usize) {
        self.prompt_len = prompt_len;
        self.steps = steps;
        self.chunk_end = match self.config.prefill_chunk {
            Some(c) => ((at / c + 1) * c).min(prompt_len),
            None => prompt_len,
        };
    }

    /// When a cache taken in the middle of this sequence's prompt can start another sequence's
    /// (whose prompt begins with the same tokens) and give exactly what its own prefill would:
    /// the policy's identity (settings, seed and resolved budgets) and the prompt positions a
    /// copy may be taken at (multiples of the returned step). The full cache qualifies (nothing
    /// is trimmed before the prompt's end), and so does a policy trimmed chunk by chunk, at its
    /// chunk boundaries (what it holds there depends only on the tokens before). A policy that
    /// trims once at the prompt's end does not: TOVA's and SnapKV's scores depend on where that
    /// end is.
    pub fn reuse_key(&self) -> Option<(String, usize)> {
        const FULL_CACHE_STEP: usize = 64;
        let step = match self.config.prefill_chunk {
            _ if self.budget == usize::MAX => FULL_CACHE_STEP,
            Some(c) => c,
            _ => return None,
        };
        let mut identity = self.config.clone();
        // The budget as resolved stands for the setting (a percentage differs per prompt).
        identity.budget = None;
        Some((format!("{identity:?}|{}|{}|{:?}", self.budget, self.recent, self.head_budgets), step))
    }

    /// The cache has been trimmed after a prompt chunk; the next one ends at `end`. SnapKV
    /// starts its scores afresh (each trim is decided by that chunk's last queries alone).
    pub fn start_prompt_chunk(&mut self, end: usize) {
        self.chunk_end = end.min(self.prompt_len);
        if self.config.kind == PolicyKind::SnapKv {
            self.scores.iter_mut().for_each(|s| s.iter_mut().for_each(|v| *v = 0.0));
        }
    }

    /// Slots a head needs beyond its budget while decoding: 1 (a token joins, one goes), or
    /// every planned step when the cache grows.
    pub fn decode_room(&self) -> usize {
        if self.config.grow {
            self.steps.max(1)
        } else {
            1
        }
    }

    /// Whether decode steps evict (not when only the prompt is compressed).
    pub fn evicts_while_decoding(&self) -> bool {
        !self.config.grow
    }

    fn slot_scores(&mut self, layer: usize, head: usize) -> &mut Vec<f32> {
        &mut self.scores[layer * self.n_kv_heads + head]
    }
    /// Drop every per-slot score (a device that keeps its own after the prompt's selection
    /// needs no host copy).
    pub fn forget_scores(&mut self) {
        self.scores.iter_mut().for_each(|s| *s = Vec::new());
    }
    /// The score of every slot of (layer, head), for inspection and tests.
    pub fn scores(&self, layer: usize, head: usize) -> &[f32] {
        &self.scores[layer * self.n_kv_heads + head]
    }

    /// Keyformer's temperature at the current step (tau_init during the prompt).
    pub fn tau(&self) -> f32 {
        let k = &self.config.keyformer;
        if !self.prompt_done || self.steps == 0 {
            return k.tau_init;
        }
        k.tau_init + self.step as f32 * (k.tau_end - k.tau_init) / self.steps as f32
    }

    /// What the attention kernel computes for the scores at this step.
    pub fn signal(&self) -> Signal {
        let last_prompt = self.chunk_end.saturating_sub(1) as u32;
        match self.config.kind {
            PolicyKind::H2o => Signal::Attention { from_position: 0 },
            PolicyKind::Tova => Signal::Attention { from_position: last_prompt },
            PolicyKind::SnapKv if !self.prompt_done => {
                Signal::Attention { from_position: self.chunk_end.saturating_sub(self.config.snapkv_window) as u32 }
            }
            PolicyKind::Kvzip if !self.prompt_done => self.reconstruction.unwrap_or(Signal::None),
            PolicyKind::Keyformer if !(self.prompt_done && self.config.keyformer.frozen) => Signal::Noisy {
                from_position: 0,
                tau: self.tau(),
                noise: self.config.keyformer.noise,
                seed: self.config.seed,
            },
            _ => Signal::None,
        }
    }

    /// Whether [`on_insert_kv`](Self::on_insert_kv) needs the token's value (value-weighted
    /// and expected-attention scores).
    pub fn wants_values(&self) -> bool {
        self.config.value_weighted || self.config.kind == PolicyKind::Expected
    }

    /// Whether the backend must gather the prompt's queries (their mean and covariance per
    /// query head, before rotary) and hand each KV head a [`QueryModel`] at the prompt's end
    /// ([`set_query_model`](Self::set_query_model)).
    pub fn wants_query_moments(&self) -> bool {
        self.config.kind == PolicyKind::Expected && !self.prompt_done
    }

    /// The model of the queries to come for (layer, head), whose query heads are `first_query`
    /// on, and the head's held tokens as (slot, position, key, value norm): each gets its
    /// expected-attention score, and tokens inserted later are scored against the same model.
    pub fn set_query_model(
        &mut self,
        layer: usize,
        head: usize,
        first_query: usize,
        mut model: QueryModel,
        held: &[(usize, u32, &[f32], f32)],
    ) {
        let i = layer * self.n_kv_heads + head;
        if i >= self.query_models.len() {
            return;
        }
        let keys: Vec<&[f32]> = held.iter().map(|&(_, _, k, _)| k).collect();
        let norms: Vec<f32> = held.iter().map(|&(_, _, _, v)| v).collect();
        let scores = if self.config.noisy_scores {
            let (kind, seed, tau) = (self.config.keyformer.noise, self.config.seed, self.config.keyformer.tau_init);
            let noise =
                |h: usize, j: usize| noise::sample(kind, seed, layer as u32, (first_query + h) as u32, 0, held[j].1);
            let mean = match kind {
                NoiseKind::None => 0.0,
                _ => noise::GUMBEL_MEAN,
            };
            model.fit_and_score_noisy(&keys, &norms, noise, mean, tau)
        } else {
            model.fit_and_score(&keys, &norms)
        };
        let s = &mut self.scores[i];
        for (&(slot, _, _, _), score) in held.iter().zip(scores) {
            if s.len() <= slot {
                s.resize(slot + 1, 0.0);
            }
            s[slot] = score;
        }
        self.query_models[i] = Some(model);
    }

    /// [`on_insert`](Self::on_insert) with the token's value, which value-weighted scores use.
    pub fn on_insert_kv(&mut self, layer: usize, head: usize, slot: usize, key: &[f32], value: &[f32]) {
        if self.config.value_weighted {
            let norms = &mut self.value_norms[layer * self.n_kv_heads + head];
            if norms.len() <= slot {
                norms.resize(slot + 1, 1.0);
            }
            norms[slot] = value.iter().map(|v| v * v).sum::<f32>().sqrt();
        }
        if self.config.key_diversity && !self.mean_keys[layer * self.n_kv_heads + head].is_empty() {
            self.weigh_key(layer, head, slot, key);
        }
        self.on_insert(layer, head, slot, key);
        if let Some(Some(model)) = self.query_models.get(layer * self.n_kv_heads + head) {
            // A token after the model was made: scored against it (before, it gets its score
            // when the model is made).
            let score = model.score(key, value.iter().map(|v| v * v).sum::<f32>().sqrt());
            self.slot_scores(layer, head)[slot] = score;
        }
    }

    /// Whether the cache must hand over each head's mean key at the end of the prompt
    /// ([`set_mean_key`](Self::set_mean_key), then [`weigh_key`](Self::weigh_key) per slot).
    pub fn wants_mean_keys(&self) -> bool {
        self.config.key_diversity && !self.prompt_done
    }

    /// The mean of (layer, head)'s keys at the end of the prompt.
    pub fn set_mean_key(&mut self, layer: usize, head: usize, mean: &[f32]) {
        let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
        self.mean_keys[layer * self.n_kv_heads + head] = mean.iter().map(|v| v / norm).collect();
    }

    /// Record the distance of `key` (in `slot`) from its head's mean key direction.
    pub fn weigh_key(&mut self, layer: usize, head: usize, slot: usize, key: &[f32]) {
        let i = layer * self.n_kv_heads + head;
        let norm = key.iter().map(|v| v * v).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
        let cos: f32 = key.iter().zip(&self.mean_keys[i]).map(|(a, b)| a * b).sum::<f32>() / norm;
        let d = &mut self.diversity[i];
        if d.len() <= slot {
            d.resize(slot + 1, 1.0);
        }
        d[slot] = 1.0 - cos;
    }

    /// Record that `slot` of (layer, head) now holds a new token with this key.
    pub fn on_insert(&mut self, layer: usize, head: usize, slot: usize, key: &[f32]) {
        let kind = self.config.kind;
        // After a frozen prompt selection new tokens are never key tokens: they go first once
        // they leave the recent window.
        let frozen_after_prompt = self.prompt_done
            && (kind == PolicyKind::SnapKv || (kind == PolicyKind::Keyformer && self.config.keyformer.frozen));
        if let Some(o) = self.observed.get_mut(layer * self.n_kv_heads + head).and_then(|o| o.get_mut(slot)) {
            *o = 0.0; // a reused slot starts its window afresh
        }
        let s = self.slot_scores(layer, head);
        if s.len() <= slot {
            s.resize(slot + 1, 0.0);
        }
        s[slot] = match kind {
            // Larger norms are evicted first: the score is the negated norm.
            PolicyKind::KNorm => -key.iter().map(|v| v * v).sum::<f32>().sqrt(),
            _ if frozen_after_prompt => f32::NEG_INFINITY,
            _ => 0.0,
        };
    }

    /// The score rows of `layer` (one per KV head, slot order) when this policy's score is a
    /// running sum of the kernel's per-slot row sums (H2O, Keyformer): the kernel may add into
    /// them directly, which equals [`observe`](Self::observe) and copies nothing. `None` for
    /// the other policies.
    pub fn running_sum_scores(&mut self, layer: usize) -> Option<&mut [Vec<f32>]> {
        self.running_rows(layer).0
    }

    /// The rows the attention kernel adds to in place at `layer`: H2O's and Keyformer's running
    /// sums (for [`signal`](Self::signal)) and the observation window's sums (for
    /// [`observation_signal`](Self::observation_signal)), per KV head.
    pub fn running_rows(&mut self, layer: usize) -> (Option<ScoreRows<'_>>, Option<ScoreRows<'_>>) {
        let heads = layer * self.n_kv_heads..(layer + 1) * self.n_kv_heads;
        let sums = matches!(self.config.kind, PolicyKind::H2o | PolicyKind::Keyformer)
            || (self.config.kind == PolicyKind::Kvzip && self.reconstruction.is_some() && !self.prompt_done);
        let observing = self.observation_signal() != Signal::None;
        (
            if sums { Some(&mut self.scores[heads.clone()]) } else { None },
            if observing { Some(&mut self.observed[heads]) } else { None },
        )
    }

    /// The second score a prompt chunk's attention computes with `observe=N`: the plain
    /// attention of the chunk's last N queries (`Signal::None` otherwise, and after the prompt).
    pub fn observation_signal(&self) -> Signal {
        match self.config.observe {
            Some(n) if !self.prompt_done && !self.observed.is_empty() => {
                Signal::Attention { from_position: self.chunk_end.saturating_sub(n) as u32 }
            }
            _ => Signal::None,
        }
    }

    /// Add the observation window's per-slot sums of (layer, head) (a shared prefill's record).
    pub fn observe_window(&mut self, layer: usize, head: usize, per_slot: &[f32]) {
        if let Some(o) = self.observed.get_mut(layer * self.n_kv_heads + head) {
            if o.len() < per_slot.len() {
                o.resize(per_slot.len(), 0.0);
            }
            o.iter_mut().zip(per_slot).for_each(|(a, b)| *a += b);
        }
    }

    /// At a prompt chunk's end, before its trim: add each head's observation window to its
    /// accumulated scores, scaled to the scores' total mass (so neither part dominates by
    /// having seen more queries), and start the next window from zero.
    pub fn fold_observation(&mut self, layer: usize) {
        if self.observed.is_empty() {
            return;
        }
        for h in 0..self.n_kv_heads {
            let i = layer * self.n_kv_heads + h;
            let window: f64 = self.observed[i].iter().map(|&v| v as f64).sum();
            let total: f64 = self.scores[i].iter().filter(|v| v.is_finite()).map(|&v| v as f64).sum();
            if window > 0.0 {
                let scale = if total > 0.0 { (total / window) as f32 } else { 1.0 };
                let (scores, observed) = (&mut self.scores[i], &mut self.observed[i]);
                if scores.len() < observed.len() {
                    scores.resize(observed.len(), 0.0);
                }
                scores.iter_mut().zip(observed.iter()).for_each(|(s, o)| *s += scale * o);
            }
            self.observed[i].iter_mut().for_each(|v| *v = 0.0);
        }
    }

    /// Fold the kernel's per-slot row sums (`per_slot[slot]`, slot order) into the scores.
    pub fn observe(&mut self, layer: usize, head: usize, per_slot: &[f32]) {
        let kind = self.config.kind;
        let s = self.slot_scores(layer, head);
        if s.len() < per_slot.len() {
            s.resize(per_slot.len(), 0.0);
        }
        match kind {
            PolicyKind::Tova => s[..per_slot.len()].copy_from_slice(per_slot),
            PolicyKind::SnapKv => {
                // Average pooling with kernel 7 over neighbouring slots (slot order is position
                // order during the prompt, the only time SnapKV scores).
                let n = per_slot.len();
                let half = SNAPKV_KERNEL / 2;
                for (i, out) in s[..n].iter_mut().enumerate() {
                    let (lo, hi) = (i.saturating_sub(half), (i + half + 1).min(n));
                    *out += per_slot[lo..hi].iter().sum::<f32>() / SNAPKV_KERNEL as f32;
                }
            }
            _ => s.iter_mut().zip(per_slot).for_each(|(a, b)| *a += b),
        }
    }

    /// Slots of (layer, head) to evict so that it holds at most `target` tokens, in eviction
    /// order. The `recent` most recent tokens (and, for `sink`, the first `sinks`) are kept.
    pub fn victims(&self, layer: usize, head: usize, table: &SlotTable, target: usize) -> Vec<usize> {
        let excess = table.len().saturating_sub(target);
        if excess == 1 {
            // A decode step: one token joined, one goes.
            if let Some(victim) = self.single_victim(layer, head, table) {
                return victim.into_iter().collect();
            }
        }
        self.victims_by_selection(layer, head, table, target)
    }

    /// The eviction score of the token at (`slot`, `pos`) when the newest held token is at
    /// `last`: lower goes first.
    fn eviction_key(&self, layer: usize, head: usize, slot: usize, pos: u32, last: u32) -> f32 {
        match self.config.kind {
            PolicyKind::Full | PolicyKind::Window | PolicyKind::Sink => 0.0, // oldest first
            PolicyKind::Random => {
                noise::uniform_open(self.config.seed, layer as u32, head as u32, self.step as u32, pos, 7) as f32
            }
            _ => self.score_key(layer, head, slot, pos, last),
        }
    }

    /// A scored policy's eviction key: its score, as a mean per observing query when
    /// `accumulate=mean` (the queries at positions `pos..=last` saw the token), times the value's
    /// norm when value-weighted.
    fn score_key(&self, layer: usize, head: usize, slot: usize, pos: u32, last: u32) -> f32 {
        let mut key = self.scores(layer, head).get(slot).copied().unwrap_or(0.0);
        let c = &self.config;
        if c.accumulate == Accumulate::Mean && matches!(c.kind, PolicyKind::H2o | PolicyKind::Keyformer) {
            key /= (last.saturating_sub(pos) + 1) as f32;
        }
        if c.value_weighted && c.kind != PolicyKind::KNorm {
            key *= self.value_norms[layer * self.n_kv_heads + head].get(slot).copied().unwrap_or(1.0);
        }
        if c.key_diversity && c.kind != PolicyKind::KNorm {
            key *= self.diversity[layer * self.n_kv_heads + head].get(slot).copied().unwrap_or(1.0);
        }
        key
    }

    /// The first positions no eviction touches: StreamingLLM's sinks, or the pinned ones.
    pub fn pinned(&self) -> u64 {
        match self.config.kind {
            PolicyKind::Sink => self.config.sinks as u64,
            PolicyKind::Full | PolicyKind::Window => 0,
            // KVzip keeps its sinks (as many as fit beside the recent window).
            PolicyKind::Kvzip => {
                let room = self.budget.saturating_sub(self.recent);
                self.config.pinned_sinks.max(KVZIP_SINKS.min(room)) as u64
            }
            _ => self.config.pinned_sinks as u64,
        }
    }

    /// KVzip: the prompt's positions `first..end` are being repeated, the repetition reading
    /// from position `from_position` on, through a copy of this sequence's cache: its attention
    /// gives this policy's scores the reconstruction maxima ([`Signal::Reconstruction`]) until
    /// [`end_reconstruction`](Self::end_reconstruction).
    pub fn begin_reconstruction(&mut self, first: u32, end: u32, from_position: u32) {
        let noise = self.config.noisy_scores.then_some(ScoreNoise {
            kind: self.config.keyformer.noise,
            tau: self.config.keyformer.tau_init,
            seed: self.config.seed,
        });
        self.reconstruction =
            Some(Signal::Reconstruction { from_position, first, end, sinks: KVZIP_SINKS as u32, noise });
    }

    /// The repetition is over: the prompt's own forward passes score nothing again.
    pub fn end_reconstruction(&mut self) {
        self.reconstruction = None;
    }

    /// Whether this policy scores the prompt by its repetition (KVzip): the forward pass must
    /// run the repetition before the prompt's end is processed.
    pub fn wants_reconstruction(&self) -> bool {
        self.config.kind == PolicyKind::Kvzip && !self.prompt_done && self.budget != usize::MAX
    }

    /// [`victims`](Self::victims) for one victim in a single pass over the slots, no
    /// allocation: at every decode step of a long context this replaces two selections over
    /// all held tokens per (layer, head). The recent window is the positions from
    /// `last - recent + 1` on when all of them are held (always, for these policies, since a
    /// recent token is never evicted); `None` when that does not hold, and the caller falls back
    /// to the general path. `Some(None)`: nothing may be evicted.
    fn single_victim(&self, layer: usize, head: usize, table: &SlotTable) -> Option<Option<usize>> {
        let last = table.last_position()?;
        let keep_recent = self.recent.min(table.len());
        let first_recent = (last as u64 + 1).checked_sub(keep_recent as u64)?;
        let sinks = self.pinned();
        let c = &self.config;
        let plain_scores = c.accumulate == Accumulate::Sum && !c.value_weighted && !c.key_diversity;
        // One loop per kind of key, each compiled with its key inlined.
        let (in_recent, best) = match c.kind {
            PolicyKind::Full | PolicyKind::Window | PolicyKind::Sink => {
                lowest_candidate(table, first_recent, sinks, |_, _| 0.0)
            }
            PolicyKind::Random => lowest_candidate(table, first_recent, sinks, |slot, pos| {
                self.eviction_key(layer, head, slot, pos, last)
            }),
            _ if plain_scores => {
                let scores = self.scores(layer, head);
                lowest_candidate(table, first_recent, sinks, |slot, _| scores.get(slot).copied().unwrap_or(0.0))
            }
            _ => lowest_candidate(table, first_recent, sinks, |slot, pos| self.score_key(layer, head, slot, pos, last)),
        };
        if in_recent != keep_recent {
            return None;
        }
        // The candidate's position identifies its slot (positions are distinct).
        let victim = (best != u64::MAX).then_some(best as u32);
        Some(victim.and_then(|pos| table.positions().iter().position(|p| *p == Some(pos))))
    }
    /// The general case of [`victims`](Self::victims): linear-time selections.
    fn victims_by_selection(&self, layer: usize, head: usize, table: &SlotTable, target: usize) -> Vec<usize> {
        let excess = table.len().saturating_sub(target);
        if excess == 0 {
            return Vec::new();
        }
        // Linear-time selection, not sorting: this runs for every (layer, head) at every step.
        let mut occupied: Vec<(usize, u32)> = table.occupied().collect();
        let last = occupied.iter().map(|&(_, p)| p).max().unwrap_or(0);
        let keep_recent = self.recent.min(occupied.len());
        let n_old = occupied.len() - keep_recent;
        if keep_recent > 0 && n_old > 0 {
            // The n_old oldest before index n_old (positions are distinct).
            occupied.select_nth_unstable_by_key(n_old, |&(_, p)| p);
        }
        occupied.truncate(n_old);
        let pinned = self.pinned();
        if pinned > 0 {
            occupied.retain(|&(_, p)| p as u64 >= pinned);
        }
        // Lowest score first; ties evict the oldest.
        let mut candidates: Vec<(f32, u32, usize)> =
            occupied.iter().map(|&(slot, pos)| (self.eviction_key(layer, head, slot, pos, last), pos, slot)).collect();
        let order = |a: &(f32, u32, usize), b: &(f32, u32, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        if excess < candidates.len() {
            candidates.select_nth_unstable_by(excess - 1, order);
            candidates.truncate(excess);
        }
        candidates.sort_by(order);
        candidates.into_iter().map(|(_, _, slot)| slot).collect()
    }

    /// The prompt has been compressed to the budget: decoding starts.
    pub fn finish_prompt(&mut self, layer_head_tables: &[&SlotTable]) {
        let kind = self.config.kind;
        if kind == PolicyKind::SnapKv || (kind == PolicyKind::Keyformer && self.config.keyformer.frozen) {
            // The prompt's recent window is a sliding window, not key tokens.
            for (i, table) in layer_head_tables.iter().enumerate() {
                let mut occ: Vec<(usize, u32)> = table.occupied().collect();
                occ.sort_unstable_by_key(|&(_, p)| std::cmp::Reverse(p));
                let s = &mut self.scores[i];
                for &(slot, _) in occ.iter().take(self.recent) {
                    s[slot] = f32::NEG_INFINITY;
                }
            }
        }
        self.prompt_done = true;
        self.step = 0;
    }

    /// Advance to the next decode step (after step `t`'s eviction).
    pub fn next_step(&mut self) {
        self.step += 1;
    }

    /// The storage was compacted: `mapping[i] = (old_slot, new_slot)` for (layer, head).
    pub fn remap(&mut self, layer: usize, head: usize, mapping: &[(usize, usize)]) {
        let new_len = mapping.iter().map(|&(_, n)| n + 1).max().unwrap_or(0);
        let moved = |old: &[f32], fill: f32| {
            let mut new = vec![fill; new_len];
            for &(o, n) in mapping {
                new[n] = old.get(o).copied().unwrap_or(fill);
            }
            new
        };
        let i = layer * self.n_kv_heads + head;
        self.scores[i] = moved(&self.scores[i], 0.0);
        if let Some(o) = self.observed.get(i) {
            let new = moved(o, 0.0);
            self.observed[i] = new;
        }
        if let Some(norms) = self.value_norms.get(i) {
            let new = moved(norms, 1.0);
            self.value_norms[i] = new;
        }
        if let Some(d) = self.diversity.get(i) {
            let new = moved(d, 1.0);
            self.diversity[i] = new;
        }
    }

    /// Forget the score of an evicted slot.
    pub fn on_evict(&mut self, layer: usize, head: usize, slot: usize) {
        if let Some(v) = self.slot_scores(layer, head).get_mut(slot) {
            *v = 0.0;
        }
        if let Some(o) = self.observed.get_mut(layer * self.n_kv_heads + head).and_then(|o| o.get_mut(slot)) {
            *o = 0.0;
        }
    }
}

/// One pass over `table`'s slots: how many held tokens are at or after `first_recent`, and the
/// lowest (eviction key, position) among the others at or after `sinks`, packed as
/// `order(key) << 32 | position` (u64::MAX: none). Packing makes the comparison one integer
/// minimum, which keeps the loop free of branches at every decode step of a long context.
fn lowest_candidate(
    table: &SlotTable,
    first_recent: u64,
    sinks: u64,
    key_of: impl Fn(usize, u32) -> f32,
) -> (usize, u64) {
    let mut in_recent = 0;
    let mut best = u64::MAX;
    for (slot, pos) in table.positions().iter().enumerate() {
        let Some(pos) = *pos else { continue };
        let recent = pos as u64 >= first_recent;
        in_recent += recent as usize;
        if !recent && pos as u64 >= sinks {
            best = best.min(((total_order_bits(key_of(slot, pos)) as u64) << 32) | pos as u64);
        }
    }
    (in_recent, best)
}

/// The bits of `x` as an unsigned integer whose order is `f32::total_cmp`'s.
fn total_order_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_keys_order_as_total_cmp() {
        let xs = [f32::NEG_INFINITY, -3.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 7.0, f32::INFINITY];
        for a in xs {
            for b in xs {
                assert_eq!(total_order_bits(a).cmp(&total_order_bits(b)), a.total_cmp(&b), "{a} vs {b}");
            }
        }
    }
    use proptest::prelude::*;

    fn policy(kind: PolicyKind, budget: usize, recent: Option<usize>, prompt_len: usize) -> SequencePolicy {
        PolicyConfig {
            kind,
            budget: Some(Amount::Tokens(budget)),
            recent: recent.map(Amount::Tokens),
            sinks: 2,
            snapkv_window: 2,
            ..Default::default()
        }
        .resolve(prompt_len, 10, 1, 1)
        .unwrap()
    }

    /// A table holding positions 0..n in slots 0..n.
    fn table(n: usize) -> SlotTable {
        let mut t = SlotTable::new(n + 1);
        for p in 0..n as u32 {
            t.insert(p).unwrap();
        }
        t
    }

    fn positions_of(t: &SlotTable, slots: &[usize]) -> Vec<u32> {
        slots.iter().map(|&s| t.position(s).unwrap()).collect()
    }

    /// Expected attention evicts the key its model of the queries to come attends least (its
    /// value norm counting), a later token is scored by the same model, and `gumbel` makes the
    /// choice a seeded draw.
    #[test]
    fn expected_evicts_the_least_expected_key_and_gumbel_is_seeded() {
        let d = PolicyConfig::default();
        let resolve = |spec: &str| {
            let c = PolicyConfig::parse_spec(spec, &d).unwrap();
            PolicyConfig { budget: Some(Amount::Tokens(3)), min_budget: 1, ..c }.resolve(4, 4, 1, 1).unwrap()
        };
        let keys: [&[f32]; 4] = [&[1.0, 0.0], &[0.0, 1.0], &[-1.0, 0.0], &[0.5, 0.5]];
        let model = || QueryModel::new(2, vec![vec![2.0, 0.0]], vec![vec![0.0; 4]], 1.0);
        let held: Vec<(usize, u32, &[f32], f32)> = (0..4).map(|j| (j, j as u32, keys[j], 1.0)).collect();
        let t = table(4);
        let mut p = resolve("expected:recent=0");
        assert!(p.wants_query_moments() && p.wants_values());
        p.set_query_model(0, 0, 0, model(), &held);
        // Logits 2, 0, -2, 1: position 2 goes.
        assert_eq!(positions_of(&t, &p.victims(0, 0, &t, 3)), vec![2]);
        // A later token in slot 2 with the best key is scored above every other.
        p.on_insert_kv(0, 0, 2, &[1.0, 0.0], &[3.0, 0.0]);
        assert!(p.scores(0, 0)[2] > p.scores(0, 0)[0]);
        let draw = |seed: u64| {
            let mut p = resolve("expected:recent=0:gumbel:tau=5-5");
            p.config.seed = seed;
            p.set_query_model(0, 0, 0, model(), &held);
            p.scores(0, 0).to_vec()
        };
        assert_eq!(draw(1), draw(1), "the same seed draws the same noise");
        assert_ne!(draw(1), draw(2));
        assert!(PolicyConfig::parse_spec("h2o:gumbel", &d).is_err(), "gumbel is expected attention's setting");
    }

    /// A preset is its expansion; settings after it apply on top, and an unknown name lists it.
    #[test]
    fn presets_parse_as_their_expansion() {
        let d = PolicyConfig::default();
        let named = PolicyConfig::parse_spec("keyformer-long:budget=50%", &d).unwrap();
        assert!(named.key_diversity);
        assert_eq!(named, PolicyConfig::parse_spec("keyformer:recent=70%:keydiff:budget=50%", &d).unwrap());
        assert_eq!((named.kind, named.recent), (PolicyKind::Keyformer, Some(Amount::Percent(70.0))));
        let over = PolicyConfig::parse_spec("keyformer-long:recent=10%", &d).unwrap();
        assert_eq!(over.recent, Some(Amount::Percent(10.0)));
        let err = PolicyConfig::parse_spec("keyformer-short", &d).unwrap_err().to_string();
        assert!(err.contains("keyformer-long"), "{err}");
        let p = PolicyConfig::from_parts(Some("keyformer-long"), Some(Amount::Percent(50.0)), &d).unwrap();
        assert_eq!(p.resolve(1000, 10, 1, 1).unwrap().recent, 350);
        let zip = PolicyConfig::parse_spec("kvzip-global:recent=0", &d).unwrap();
        assert_eq!(
            (zip.kind, zip.layer_budgets, zip.recent),
            (PolicyKind::Kvzip, LayerBudgets::Global, Some(Amount::Tokens(0)))
        );
    }

    #[test]
    fn window_and_sink_evict_the_oldest_outside_what_they_keep() {
        let t = table(6);
        let p = policy(PolicyKind::Window, 4, None, 6);
        assert_eq!(positions_of(&t, &p.victims(0, 0, &t, 4)), vec![0, 1]);
        // Sinks 0 and 1 stay, so 2 and 3 go.
        let p = policy(PolicyKind::Sink, 4, None, 6);
        assert_eq!(p.recent, 2);
        assert_eq!(positions_of(&t, &p.victims(0, 0, &t, 4)), vec![2, 3]);
    }

    #[test]
    fn h2o_accumulates_and_keeps_heavy_hitters_and_the_recent_window() {
        // 6 tokens, budget 3, recent 1: position 5 stays; of 0..5 keep the two heaviest.
        let t = table(6);
        let mut p = policy(PolicyKind::H2o, 3, Some(1), 6);
        for s in 0..6 {
            p.on_insert(0, 0, s, &[0.0]);
        }
        p.observe(0, 0, &[0.10, 0.40, 0.05, 0.20, 0.05, 0.20]);
        p.observe(0, 0, &[0.10, 0.10, 0.10, 0.30, 0.10, 0.30]);
        // Totals: 0.2, 0.5, 0.15, 0.5, 0.15, 0.5. Evict the three lowest of 0..5: 2 and 4
        // tie at 0.15 (older first), then 0 at 0.2.
        assert_eq!(positions_of(&t, &p.victims(0, 0, &t, 3)), vec![2, 4, 0]);
    }

    #[test]
    fn tova_replaces_scores_instead_of_accumulating() {
        let t = table(4);
        let mut p = policy(PolicyKind::Tova, 3, Some(0), 4);
        p.observe(0, 0, &[0.9, 0.0, 0.05, 0.05]);
        p.observe(0, 0, &[0.1, 0.5, 0.2, 0.2]);
        // Only the last row counts: token 0 (0.1) goes, although it was heaviest before.
        assert_eq!(positions_of(&t, &p.victims(0, 0, &t, 3)), vec![0]);
    }

    #[test]
    fn random_is_seeded_and_spares_the_recent_window() {
        let t = table(10);
        let pick = |seed| {
            let mut cfg = policy(PolicyKind::Random, 5, Some(3), 10).config;
            cfg.seed = seed;
            let p = cfg.resolve(10, 10, 1, 1).unwrap();
            positions_of(&t, &p.victims(0, 0, &t, 5))
        };
        assert_eq!(pick(1), pick(1));
        assert!((0..8).map(pick).collect::<std::collections::HashSet<_>>().len() > 1, "seeds differ");
        for seed in 0..8 {
            let v = pick(seed);
            assert_eq!(v.len(), 5);
            assert!(v.iter().all(|&p| p < 7), "{v:?} touches the recent window 7..10");
        }
    }

    #[test]
    fn keyformer_accumulates_like_h2o_and_reselects_every_step() {
        // Budget 3, recent 1. Scores after the prompt favour 0 and 1; then decode rows move
        // the weight to 2, and the selection follows (the reference code's frozen set would not).
        let mut t = table(4);
        let mut p = policy(PolicyKind::Keyformer, 3, Some(1), 4);
        p.observe(0, 0, &[0.5, 0.4, 0.1, 0.0]);
        assert_eq!(positions_of(&t, &p.victims(0, 0, &t, 3)), vec![2]);
        p.finish_prompt(&[&t]);
        // Step 0: token 4 joins; its row gives 2 a lot of weight. Candidates 0..4 (4 is recent).
        let slot = t.insert(4).unwrap();
        p.on_insert(0, 0, slot, &[0.0]);
        p.observe(0, 0, &[0.0, 0.0, 0.9, 0.0, 0.1]);
        // Totals 0.5, 0.4, 1.0, 0.0: evict 3 (0.0) and then 1 (0.4) to get from 5 to 3.
        assert_eq!(positions_of(&t, &p.victims(0, 0, &t, 3)), vec![3, 1]);
        let mut frozen = p.config.clone();
        frozen.keyformer.frozen = true;
        let mut f = frozen.resolve(4, 10, 1, 1).unwrap();
        t = table(4);
        f.observe(0, 0, &[0.5, 0.4, 0.1, 0.0]);
        f.finish_prompt(&[&t]);
        let slot = t.insert(4).unwrap();
        f.on_insert(0, 0, slot, &[0.0]);
        // Frozen: the prompt's window token (3) and newcomers are never key tokens, so the
        // oldest of them goes first whatever the new attention says.
        assert_eq!(positions_of(&t, &f.victims(0, 0, &t, 4)), vec![3]);
    }

    #[test]
    fn a_chunked_prompt_scores_each_chunk_with_its_own_last_queries() {
        // A 100-token prompt trimmed every 40 tokens under a budget of 10.
        let chunked = |kind| {
            PolicyConfig {
                kind,
                budget: Some(Amount::Tokens(10)),
                prefill_chunk: Some(40),
                snapkv_window: 4,
                ..Default::default()
            }
            .resolve(100, 5, 1, 1)
            .unwrap()
        };
        let mut snap = chunked(PolicyKind::SnapKv);
        assert_eq!(snap.prompt_chunk(), Some(40));
        assert_eq!(snap.capacity(1000), 50, "budget + chunk slots");
        assert_eq!(snap.held_during_prompt(0, 0), 50);
        assert_eq!(snap.signal(), Signal::Attention { from_position: 36 }, "the first chunk's last 4 queries");
        snap.observe(0, 0, &[1.0; 50]);
        snap.start_prompt_chunk(80);
        assert!(snap.scores(0, 0).iter().all(|&v| v == 0.0), "a new chunk scores afresh");
        assert_eq!(snap.signal(), Signal::Attention { from_position: 76 });
        snap.start_prompt_chunk(120);
        assert_eq!(snap.signal(), Signal::Attention { from_position: 96 }, "the last chunk ends with the prompt");
        let mut tova = chunked(PolicyKind::Tova);
        assert_eq!(tova.signal(), Signal::Attention { from_position: 39 });
        tova.start_prompt_chunk(80);
        assert_eq!(tova.signal(), Signal::Attention { from_position: 79 });
        // H2O's sums carry over between chunks.
        let mut h2o = chunked(PolicyKind::H2o);
        h2o.observe(0, 0, &[0.5, 0.25]);
        h2o.start_prompt_chunk(80);
        assert_eq!(h2o.scores(0, 0), &[0.5, 0.25]);
        // No chunking when the chunk covers the prompt or nothing is evicted.
        let covering = PolicyConfig { prefill_chunk: Some(100), ..chunked(PolicyKind::H2o).config };
        assert_eq!(covering.resolve(100, 5, 1, 1).unwrap().prompt_chunk(), None);
        let full = PolicyConfig { prefill_chunk: Some(40), ..Default::default() }.resolve(100, 5, 1, 1).unwrap();
        assert_eq!((full.prompt_chunk(), full.held_during_prompt(0, 0)), (None, 100));
        let zero = PolicyConfig { prefill_chunk: Some(0), ..chunked(PolicyKind::H2o).config };
        assert!(zero.validate().is_err());
        assert_eq!(
            PolicyConfig::parse_spec("h2o:chunk=256", &PolicyConfig::default()).unwrap().prefill_chunk,
            Some(256)
        );
    }

    #[test]
    fn knorm_evicts_the_largest_key_norm() {
        let t = table(4);
        let mut p = policy(PolicyKind::KNorm, 3, Some(1), 4);
        for (s, k) in [[1.0, 0.0], [3.0, 4.0], [0.0, 2.0], [9.0, 9.0]].iter().enumerate() {
            p.on_insert(0, 0, s, k);
        }
        // Norms 1, 5, 2, 12.7; position 3 is in the recent window, so position 1 (norm 5) goes.
        assert_eq!(positions_of(&t, &p.victims(0, 0, &t, 3)), vec![1]);
    }

    /// KVzip scores nothing during its prompt; a repetition's copy gets the reconstruction
    /// signal and maxima rows to merge into until it ends; its sinks are pinned (as many as
    /// fit); it cannot trim its prompt chunk by chunk.
    #[test]
    fn kvzip_scores_only_through_a_repetition() {
        let spec = |s: &str| PolicyConfig::parse_spec(s, &PolicyConfig::default());
        let mut p = spec("kvzip:budget=10:recent=2").unwrap().resolve(40, 0, 1, 2).unwrap();
        assert_eq!(p.signal(), Signal::None);
        assert!(p.wants_reconstruction() && p.running_rows(0).0.is_none());
        assert_eq!(p.pinned(), KVZIP_SINKS as u64);
        p.begin_reconstruction(0, 40, 45);
        assert_eq!(p.signal(), Signal::Reconstruction { from_position: 45, first: 0, end: 40, sinks: 4, noise: None });
        assert!(p.signal().merges_by_max() && p.running_rows(0).0.is_some_and(|rows| rows.len() == 2));
        p.end_reconstruction();
        assert_eq!(p.signal(), Signal::None);
        let tight = spec("kvzip:budget=5:recent=3").unwrap().resolve(40, 0, 1, 1).unwrap();
        assert_eq!(tight.pinned(), 2, "the sinks that fit beside the recent window");
        let full = spec("kvzip:budget=100%").unwrap().resolve(40, 0, 1, 1).unwrap();
        assert!(full.wants_reconstruction(), "a covering budget still scores (nothing is evicted)");
        let err = spec("kvzip:budget=10:chunk=16").map(|c| c.validate());
        assert!(matches!(err, Ok(Err(PolicyError::Invalid(_))) | Err(PolicyError::Invalid(_))), "{err:?}");
        // `gumbel`: the repetition's softmax takes Keyformer's noise and starting temperature.
        let mut noisy = spec("kvzip:budget=10:gumbel:tau=1.5-3").unwrap().resolve(40, 0, 1, 2).unwrap();
        noisy.begin_reconstruction(0, 40, 45);
        let seed = noisy.config.seed;
        let noise = Some(ScoreNoise { kind: NoiseKind::Gumbel, tau: 1.5, seed });
        assert_eq!(noisy.signal(), Signal::Reconstruction { from_position: 45, first: 0, end: 40, sinks: 4, noise });
        assert!(spec("h2o:gumbel").is_err(), "gumbel is a setting of expected and kvzip only");
    }

    #[test]
    fn snapkv_pools_prompt_scores_then_slides_its_window() {
        let t = table(8);
        let mut p = policy(PolicyKind::SnapKv, 4, None, 8);
        assert_eq!(p.recent, 2, "the observation window is the recent window");
        assert_eq!(p.signal(), Signal::Attention { from_position: 6 });
        for s in 0..8 {
            p.on_insert(0, 0, s, &[0.0]);
        }
        // One spike at position 1: pooling (kernel 7, /7) spreads it over positions 0..=4.
        p.observe(0, 0, &[0.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(&p.scores(0, 0)[..6], &[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
        // Keep 2 of positions 0..6 (the two oldest among equals go first): 0,1,2,5 evicted.
        assert_eq!(positions_of(&t, &p.victims(0, 0, &t, 4)), vec![5, 0, 1, 2]);
        assert_eq!(p.signal(), Signal::Attention { from_position: 6 });
    }

    #[test]
    fn keyformer_temperature_rises_linearly_and_frozen_stops_scoring() {
        let mut p = PolicyConfig { kind: PolicyKind::Keyformer, budget: Some(Amount::Tokens(4)), ..Default::default() }
            .resolve(8, 10, 1, 1)
            .unwrap();
        assert_eq!(p.tau(), 1.0);
        p.finish_prompt(&[]);
        for _ in 0..5 {
            p.next_step();
        }
        assert!((p.tau() - 1.5).abs() < 1e-6);
        let mut frozen = p.config.clone();
        frozen.keyformer.frozen = true;
        let mut f = frozen.resolve(8, 10, 1, 1).unwrap();
        assert!(matches!(f.signal(), Signal::Noisy { .. }), "the prompt is scored");
        f.finish_prompt(&[]);
        assert_eq!(f.signal(), Signal::None, "after the prompt the selection is fixed");
    }

    #[test]
    fn budgets_resolve_and_bad_ones_are_refused() {
        let p = PolicyConfig {
            kind: PolicyKind::H2o,
            budget: Some("50%".parse().unwrap()),
            min_budget: 1,
            ..Default::default()
        };
        let s = p.resolve(101, 0, 1, 1).unwrap();
        assert_eq!((s.budget, s.recent), (51, 15), "50% of 101 rounds to 51; recent 30% of 51");
        assert!(matches!(
            "0".parse::<Amount>().map(|b| PolicyConfig { budget: Some(b), ..p.clone() }.validate()),
            Ok(Err(PolicyError::ZeroBudget(_)))
        ));
        let bad = PolicyConfig { budget: Some(Amount::Tokens(8)), recent: Some(Amount::Tokens(9)), ..p.clone() };
        assert_eq!(bad.validate(), Err(PolicyError::RecentOverBudget { recent: 9, budget: 8 }));
        assert!("lru".parse::<PolicyKind>().is_err());
        assert!("12x".parse::<Amount>().is_err() && "-5%".parse::<Amount>().is_err());
        let covering = PolicyConfig { budget: Some("150%".parse().unwrap()), ..p.clone() };
        assert_eq!(covering.resolve(100, 0, 1, 1).unwrap().budget, 150, "over 100% covers the prompt");
        let none = PolicyConfig { budget: None, ..p };
        assert!(none.validate().is_err(), "a policy without a budget");
    }

    #[test]
    fn a_percentage_budget_never_falls_below_the_floor_but_tokens_are_exact() {
        let p = PolicyConfig { kind: PolicyKind::Keyformer, budget: Some(Amount::Percent(50.0)), ..Default::default() };
        assert_eq!(p.resolve(31, 8, 1, 1).unwrap().budget, DEFAULT_MIN_BUDGET, "a short chat keeps its prompt");
        assert_eq!(p.resolve(1, 8, 1, 1).unwrap().budget, DEFAULT_MIN_BUDGET);
        assert_eq!(p.resolve(1000, 8, 1, 1).unwrap().budget, 500, "above the floor, the percentage");
        let lower = PolicyConfig { min_budget: 8, ..p.clone() };
        assert_eq!(lower.resolve(10, 8, 1, 1).unwrap().budget, 8);
        let tokens = PolicyConfig { budget: Some(Amount::Tokens(4)), ..p.clone() };
        assert_eq!(tokens.resolve(31, 8, 1, 1).unwrap().budget, 4, "a budget in tokens is taken as given");
        assert!(PolicyConfig { min_budget: 0, ..p }.validate().is_err());
    }

    #[test]
    fn one_policy_syntax_parses_kind_options_and_refuses_the_rest() {
        let d = PolicyConfig::default();
        let k = PolicyConfig::parse_spec("keyformer:noise=none:recent=10%:tau=1-1:frozen:budget=128", &d).unwrap();
        assert_eq!(k.kind, PolicyKind::Keyformer);
        assert_eq!((k.keyformer.noise, k.keyformer.tau_init, k.keyformer.tau_end), (NoiseKind::None, 1.0, 1.0));
        assert!(k.keyformer.frozen);
        assert_eq!((k.recent, k.budget), (Some(Amount::Percent(10.0)), Some(Amount::Tokens(128))));
        let s = PolicyConfig::parse_spec("sink:sinks=8:min-budget=16", &d).unwrap();
        assert_eq!((s.sinks, s.min_budget), (8, 16));
        for bad in ["lru", "h2o:foo=1", "sink:sinks=x", "keyformer:tau=2", "keyformer:noise=loud", "h2o:budget=0x"] {
            assert!(PolicyConfig::parse_spec(bad, &d).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_budget_alone_means_keyformer_and_the_full_cache_refuses_one() {
        let d = PolicyConfig::default();
        let half = Some(Amount::Percent(50.0));
        assert_eq!(PolicyConfig::from_parts(None, half, &d).unwrap().kind, PolicyKind::Keyformer);
        assert_eq!(PolicyConfig::from_parts(None, None, &d).unwrap().kind, PolicyKind::Full);
        assert!(PolicyConfig::from_parts(Some("full"), half, &d).is_err());
        assert!(PolicyConfig::from_parts(Some("h2o"), None, &d).is_err(), "a policy needs a budget");
        let h2o = PolicyConfig::from_parts(Some("h2o"), half, &d).unwrap();
        assert_eq!((h2o.kind, h2o.budget), (PolicyKind::H2o, half));
        // A server default of h2o@50%: a request naming only a budget keeps h2o.
        assert_eq!(PolicyConfig::from_parts(None, Some(Amount::Tokens(9)), &h2o).unwrap().kind, PolicyKind::H2o);
        // A request asking for the full cache under a compressing default drops the budget.
        assert_eq!(PolicyConfig::from_parts(Some("full"), None, &h2o).unwrap().budget, None);
    }

    /// accumulate=mean: an old token with a larger sum but fewer attention per observing query
    /// loses to a newer one (hand-computed: 1.2 / 6 = 0.2 against 0.5 / 2 = 0.25).
    #[test]
    fn mean_accumulation_does_not_favour_old_tokens() {
        let run = |accumulate| {
            let mut p = PolicyConfig {
                kind: PolicyKind::H2o,
                budget: Some(Amount::Tokens(2)),
                recent: Some(Amount::Tokens(1)),
                accumulate,
                ..Default::default()
            }
            .resolve(6, 0, 1, 1)
            .unwrap();
            let t = table(6);
            p.observe(0, 0, &[1.2, 0.1, 0.1, 0.1, 0.5, 0.3]);
            let victims = p.victims(0, 0, &t, 2);
            let kept: Vec<u32> = (0..6).filter(|s| !victims.contains(s)).map(|s| s as u32).collect();
            kept
        };
        assert_eq!(run(Accumulate::Sum), vec![0, 5]);
        assert_eq!(run(Accumulate::Mean), vec![4, 5]);
    }

    #[test]
    fn an_observation_window_is_scaled_to_the_sums_and_added() {
        // Sums [1, 2, 3, 0] (mass 6), the window's attention [0, 0, 1, 2] (mass 3): scaled by 2
        // and added, [1, 2, 5, 4]; a budget of 2 without a recent window keeps slots 2 and 3,
        // where the sums alone keep 1 and 2.
        let config = PolicyConfig {
            kind: PolicyKind::H2o,
            budget: Some(Amount::Tokens(2)),
            recent: Some(Amount::Tokens(0)),
            ..Default::default()
        };
        let mut t = SlotTable::new(4);
        let run = |observe: Option<usize>, t: &SlotTable| {
            let mut p = PolicyConfig { observe, ..config.clone() }.resolve(4, 1, 1, 1).unwrap();
            p.observe(0, 0, &[1.0, 2.0, 3.0, 0.0]);
            p.observe_window(0, 0, &[0.0, 0.0, 1.0, 2.0]);
            p.fold_observation(0);
            let mut v = p.victims(0, 0, t, 2);
            v.sort_unstable();
            (v, p.scores(0, 0).to_vec())
        };
        for pos in 0..4 {
            t.insert(pos).unwrap();
        }
        assert_eq!(run(None, &t), (vec![0, 3], vec![1.0, 2.0, 3.0, 0.0]));
        assert_eq!(run(Some(2), &t), (vec![0, 1], vec![1.0, 2.0, 5.0, 4.0]));
        // Only H2O and Keyformer accumulate; 0 queries observe nothing.
        for bad in ["tova:budget=4:observe=8", "keyformer:budget=4:observe=0", "snapkv:budget=4:observe=8"] {
            assert!(PolicyConfig::parse_spec(bad, &PolicyConfig::default()).unwrap().validate().is_err(), "{bad}");
        }
    }

    /// sinks=N on a scored policy pins the first tokens; value weighting evicts a token whose
    /// value is tiny however much it is attended.
    #[test]
    fn pinned_sinks_and_value_weights_compose_with_a_score() {
        let spec = |s: &str| PolicyConfig::parse_spec(s, &PolicyConfig::default()).unwrap();
        let mut p =
            PolicyConfig { budget: Some(Amount::Tokens(3)), recent: Some(Amount::Tokens(1)), ..spec("h2o:sinks=1") }
                .resolve(6, 0, 1, 1)
                .unwrap();
        assert_eq!(p.config.pinned_sinks, 1);
        let t = table(6);
        p.observe(0, 0, &[0.0, 0.9, 0.1, 0.8, 0.2, 0.0]);
        let mut kept: Vec<usize> = (0..6).filter(|s| !p.victims(0, 0, &t, 3).contains(s)).collect();
        kept.sort();
        assert_eq!(kept, vec![0, 1, 5], "position 0 is pinned though its score is the lowest");
        let mut p =
            PolicyConfig { budget: Some(Amount::Tokens(2)), recent: Some(Amount::Tokens(1)), ..spec("tova:value") }
                .resolve(4, 0, 1, 1)
                .unwrap();
        let t = table(4);
        for slot in 0..4 {
            let value = if slot == 1 { [0.01, 0.0] } else { [1.0, 0.0] };
            p.on_insert_kv(0, 0, slot, &[1.0], &value);
        }
        p.observe(0, 0, &[0.2, 0.5, 0.3, 0.0]);
        // Scores x value norms: 0.2, 0.005, 0.3: position 2 is kept, 1 goes first.
        assert_eq!(p.victims(0, 0, &t, 2), vec![1, 0]);
        for bad in ["h2o:accumulate=median", "h2o:value=yes"] {
            assert!(PolicyConfig::parse_spec(bad, &PolicyConfig::default()).is_err(), "{bad}");
        }
        let no_room =
            PolicyConfig { budget: Some(Amount::Tokens(4)), recent: Some(Amount::Tokens(3)), ..spec("h2o:sinks=2") };
        assert!(no_room.resolve(10, 0, 1, 1).is_err());
    }

    /// PyramidKV: 1.5x the budget at the first layer down to 0.5x at the last, the same total.
    #[test]
    fn pyramid_budgets_fall_by_layer_and_keep_the_total() {
        let p = PolicyConfig {
            kind: PolicyKind::H2o,
            budget: Some(Amount::Tokens(8)),
            recent: Some(Amount::Tokens(1)),
            layer_budgets: LayerBudgets::Pyramid,
            ..Default::default()
        }
        .resolve(100, 0, 4, 2)
        .unwrap();
        let layers: Vec<usize> = (0..4).map(|l| p.head_budget(l, 0)).collect();
        // 12, 9.33, 6.67, 4 floored to 12, 9, 6, 4 (31), then +1 to the smallest.
        assert_eq!(layers, vec![12, 9, 6, 5]);
        assert_eq!((0..4).map(|l| p.layer_budget(l)).sum::<usize>(), 4 * 2 * 8);
        assert!(PolicyConfig::parse_spec("window:layers=pyramid", &PolicyConfig::default())
            .unwrap()
            .resolve(10, 0, 2, 1)
            .is_err());
    }

    /// AdaKV: a head whose attention is concentrated on few tokens gives its share to a head
    /// that needs more, above a floor; the layer's total stays.
    #[test]
    fn adaptive_budgets_follow_the_scores_across_heads_above_a_floor() {
        let mut p = PolicyConfig {
            kind: PolicyKind::H2o,
            budget: Some(Amount::Tokens(4)),
            recent: Some(Amount::Tokens(1)),
            adaptive: true,
            ..Default::default()
        }
        .resolve(8, 0, 1, 2)
        .unwrap();
        let t = table(8);
        // Head 0: every old token well attended; head 1: nothing stands out.
        p.observe(0, 0, &[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.0]);
        p.observe(0, 1, &[0.05, 0.04, 0.03, 0.02, 0.01, 0.01, 0.01, 0.0]);
        p.plan_adaptive(0, &[&t, &t]);
        // Shares of 3 key tokens, floors of ceil(0.2 x 3) = 1: 4 more go to the best keys,
        // all head 0's. Recent 1 + floor 1 + 4 and 1 + 1 + 0.
        assert_eq!((p.head_budget(0, 0), p.head_budget(0, 1)), (6, 2));
        assert_eq!(p.layer_budget(0), 8);
        assert_eq!(p.victims(0, 0, &t, p.head_budget(0, 0)).len(), 2);
        assert_eq!(p.victims(0, 1, &t, p.head_budget(0, 1)).len(), 6);
    }

    /// layers=global: the model's key tokens go to the best scores of every layer's heads
    /// together, with no floor (KVzip's allocation); per-layer `plan_adaptive` leaves them.
    #[test]
    fn global_budgets_follow_the_scores_across_layers() {
        let mut p = PolicyConfig {
            kind: PolicyKind::H2o,
            budget: Some(Amount::Tokens(4)),
            recent: Some(Amount::Tokens(1)),
            layer_budgets: LayerBudgets::Global,
            ..Default::default()
        }
        .resolve(8, 0, 2, 1)
        .unwrap();
        let t = table(8);
        // Layer 0's old tokens all beat layer 1's but its two best: 0.95 and 0.9 there.
        p.observe(0, 0, &[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.0]);
        p.observe(1, 0, &[0.95, 0.05, 0.04, 0.91, 0.01, 0.01, 0.01, 0.0]);
        p.plan_adaptive(0, &[&t]);
        assert_eq!(p.head_budget(0, 0), 4, "plan_adaptive leaves a global budget alone");
        p.plan_global(&[(0, 0, &t), (1, 0, &t)]);
        // 2 x 3 key tokens: 0.95, 0.91, 0.9, 0.8, 0.7, 0.6 -> layer 0 four, layer 1 two.
        assert_eq!((p.head_budget(0, 0), p.head_budget(1, 0)), (1 + 4, 1 + 2));
        let kept = |layer: usize| -> Vec<usize> {
            let victims = p.victims(layer, 0, &t, p.head_budget(layer, 0));
            (0..8).filter(|s| !victims.contains(s)).collect()
        };
        assert_eq!(kept(0), vec![0, 1, 2, 3, 7]);
        assert_eq!(kept(1), vec![0, 3, 7]);
    }

    /// keydiff: the score times 1 - cos(key, mean key): of two tokens attended alike, the one
    /// whose key points where every key points goes first.
    #[test]
    fn key_diversity_evicts_the_key_most_like_the_mean() {
        let mut p = PolicyConfig {
            kind: PolicyKind::H2o,
            budget: Some(Amount::Tokens(2)),
            recent: Some(Amount::Tokens(1)),
            key_diversity: true,
            ..Default::default()
        }
        .resolve(4, 0, 1, 1)
        .unwrap();
        let t = table(4);
        let keys = [[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.0]];
        for (slot, k) in keys.iter().enumerate() {
            p.on_insert_kv(0, 0, slot, k, &[1.0]);
        }
        p.observe(0, 0, &[0.5, 0.5, 0.5, 0.1]);
        assert!(p.wants_mean_keys());
        // Mean direction (3, 1.1) / 3.195 = (0.939, 0.344): cosines 0.939 (slot 0), 0.969
        // (slot 1, the nearest), 0.344 (slot 2, the farthest); the scores are equal, so slot 1
        // goes first, then slot 0, and slot 2 stays.
        p.set_mean_key(0, 0, &[3.0, 1.1]);
        for (slot, k) in keys.iter().enumerate() {
            p.weigh_key(0, 0, slot, k);
        }
        assert_eq!(p.victims(0, 0, &t, 2), vec![1, 0]);
    }

    /// `n` scores in [0, 1) in steps of 1 / `levels`, from a xorshift state.
    fn random_scores(rng: &mut u64, n: usize, levels: u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *rng ^= *rng << 13;
                *rng ^= *rng >> 7;
                *rng ^= *rng << 17;
                (*rng % levels) as f32 / levels as f32
            })
            .collect()
    }

    /// A `layers=global` policy (recent window a quarter of the budget, `pinned` sinks as fit)
    /// over `layers` x `heads` heads of one prompt, each head's scores random of `levels` levels;
    /// and the prompt's table.
    #[allow(clippy::too_many_arguments)]
    fn global_policy(
        kind: PolicyKind,
        budget: usize,
        layers: usize,
        heads: usize,
        prompt: usize,
        pinned: usize,
        adaptive: bool,
        seed: u64,
        levels: u64,
    ) -> (SequencePolicy, SlotTable) {
        let recent = budget / 4;
        let mut p = PolicyConfig {
            kind,
            budget: Some(Amount::Tokens(budget)),
            recent: Some(Amount::Tokens(recent)),
            pinned_sinks: pinned.min(budget - recent),
            adaptive,
            layer_budgets: LayerBudgets::Global,
            ..Default::default()
        }
        .resolve(prompt, 0, layers, heads)
        .unwrap();
        let mut rng = seed | 1;
        for l in 0..layers {
            for h in 0..heads {
                p.observe(l, h, &random_scores(&mut rng, prompt, levels));
            }
        }
        (p, table(prompt))
    }

    /// Every (layer, head) over one table.
    fn all_heads(layers: usize, heads: usize, t: &SlotTable) -> Vec<(usize, usize, &SlotTable)> {
        (0..layers).flat_map(|l| (0..heads).map(move |h| (l, h, t))).collect()
    }

    proptest! {
        /// Adaptive budgets: every head keeps at least its recent window, pinned sinks and
        /// floor, the layer never holds more than budget x heads, and a covering budget keeps
        /// everything.
        #[test]
        fn adaptive_budgets_respect_floors_and_the_layer_total(
            budget in 2usize..16, heads in 1usize..5, prompt in 2usize..40, pinned in 0usize..2,
            seed in any::<u64>(),
        ) {
            let recent = budget / 4;
            let pinned = pinned.min(budget - recent);
            let mut p = PolicyConfig {
                kind: PolicyKind::Keyformer, budget: Some(Amount::Tokens(budget)),
                recent: Some(Amount::Tokens(recent)), pinned_sinks: pinned, adaptive: true, ..Default::default()
            }.resolve(prompt, 0, 1, heads).unwrap();
            let t = table(prompt);
            let mut rng = seed | 1;
            for h in 0..heads {
                let row = random_scores(&mut rng, prompt, 1000);
                p.observe(0, h, &row);
            }
            let tables = vec![&t; heads];
            p.plan_adaptive(0, &tables);
            prop_assert!(p.layer_budget(0) <= budget * heads);
            let floor = ((budget - recent - pinned) as f64 * ADAPTIVE_FLOOR).ceil() as usize;
            for h in 0..heads {
                let kept = prompt - p.victims(0, h, &t, p.head_budget(0, h)).len();
                prop_assert!(kept <= p.head_budget(0, h));
                prop_assert!(kept >= (recent + pinned + floor).min(prompt));
            }
            if budget >= prompt {
                for h in 0..heads { prop_assert!(p.victims(0, h, &t, p.head_budget(0, h)).is_empty()); }
            }
        }

        /// The budgets spread by selection equal those of a full sort of every head's keys and
        /// of the pool (the algorithm written plainly here), scores of few levels making ties.
        #[test]
        fn spread_budgets_equal_a_full_sort(
            budget in 2usize..16, layers in 1usize..4, heads in 1usize..4, prompt in 2usize..40,
            pinned in 0usize..2, adaptive in any::<bool>(), levels in 2u64..6, seed in any::<u64>(),
        ) {
            let (mut p, t) = global_policy(PolicyKind::H2o, budget, layers, heads, prompt, pinned, adaptive, seed, levels);
            let all = all_heads(layers, heads, &t);
            // The reference: sort each head's keys and the pool (stable), best first.
            let fixed = p.recent + p.pinned() as usize;
            let share = budget.saturating_sub(fixed);
            let floor = if adaptive { (share as f64 * ADAPTIVE_FLOOR).ceil() as usize } else { 0 };
            let last = (prompt - 1) as u32;
            let first_recent = (prompt as u64).saturating_sub(p.recent as u64);
            let mut pool = Vec::new();
            let mut available = 0;
            for (i, &(l, h, _)) in all.iter().enumerate() {
                let mut keys: Vec<(f32, u32, usize)> = t
                    .occupied()
                    .filter(|&(_, pos)| (pos as u64) < first_recent && pos as u64 >= p.pinned())
                    .map(|(slot, pos)| (p.eviction_key(l, h, slot, pos, last), pos, i))
                    .collect();
                keys.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
                available += keys.len();
                pool.extend_from_slice(&keys[floor.min(keys.len())..]);
            }
            pool.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
            let quota = (share - floor) * all.len();
            let mut want = vec![budget; all.len()];
            if available > share * all.len() {
                want = vec![fixed + floor; all.len()];
                for &(_, _, i) in pool.iter().take(quota) {
                    want[i] += 1;
                }
            }
            p.plan_global(&all);
            let got: Vec<usize> = all.iter().map(|&(l, h, _)| p.head_budget(l, h)).collect();
            prop_assert_eq!(got, want);
        }

        /// layers=global (with or without AdaKV's floor): the heads of all layers together
        /// hold no more than the model's budget, each at least its window, sinks and floor,
        /// and a budget covering the prompt evicts nothing.
        #[test]
        fn global_budgets_respect_floors_and_the_model_total(
            budget in 2usize..16, layers in 1usize..4, heads in 1usize..4, prompt in 2usize..40,
            pinned in 0usize..2, adaptive in any::<bool>(), seed in any::<u64>(),
        ) {
            let (mut p, t) =
                global_policy(PolicyKind::Keyformer, budget, layers, heads, prompt, pinned, adaptive, seed, 1000);
            let (recent, pinned) = (p.recent, p.pinned() as usize);
            let all = all_heads(layers, heads, &t);
            p.plan_global(&all);
            let total: usize = (0..layers).map(|l| p.layer_budget(l)).sum();
            prop_assert!(total <= budget * heads * layers);
            let share = budget - recent - pinned;
            let floor = if adaptive { (share as f64 * ADAPTIVE_FLOOR).ceil() as usize } else { 0 };
            for l in 0..layers {
                for h in 0..heads {
                    let kept = prompt - p.victims(l, h, &t, p.head_budget(l, h)).len();
                    prop_assert!(kept <= p.head_budget(l, h));
                    prop_assert!(kept >= (recent + pinned + floor).min(prompt));
                    if budget >= prompt { prop_assert_eq!(kept, prompt); }
                }
            }
        }

        /// A prompt trimmed chunk by chunk with random scores (every policy but `full`): the
        /// table never holds more than budget + chunk, each trim leaves the budget with the
        /// recent window intact, and the slots the policy allots suffice.
        #[test]
        fn chunked_prompts_stay_within_budget_plus_chunk(
            kind_i in 1usize..9, budget in 1usize..12, chunk in 1usize..10, prompt in 1usize..60,
            seed in any::<u64>(),
        ) {
            let kind = PolicyKind::ALL[kind_i];
            let cfg = PolicyConfig {
                kind, budget: Some(Amount::Tokens(budget)), recent: Some(Amount::Tokens(budget / 3)),
                sinks: budget.min(2), snapkv_window: 2.min(budget), prefill_chunk: Some(chunk), seed, ..Default::default()
            };
            let mut p = cfg.resolve(prompt, 0, 1, 1).unwrap();
            let mut t = SlotTable::new(p.capacity(prompt));
            let mut rng = seed | 1;
            for pos in 0..prompt as u32 {
                let slot = t.insert(pos).map_err(|e| TestCaseError::fail(format!("{e} at {pos}")))?;
                p.on_insert_kv(0, 0, slot, &[pos as f32 % 3.0], &[1.0]);
                let row = random_scores(&mut rng, t.high_water(), 1000);
                if let Signal::Attention { from_position } | Signal::Noisy { from_position, .. } = p.signal() {
                    if pos >= from_position { p.observe(0, 0, &row); }
                }
                prop_assert!(t.len() <= budget + chunk);
                let end = pos as usize + 1;
                if p.prompt_chunk().is_some() && end % chunk == 0 && end < prompt {
                    for slot in p.victims(0, 0, &t, budget) {
                        t.evict(slot).unwrap();
                        p.on_evict(0, 0, slot);
                    }
                    prop_assert!(t.len() <= budget);
                    let recent = p.recent.min(t.len()) as u32;
                    for r in 0..recent {
                        prop_assert!(t.occupied().any(|(_, q)| q == pos - r), "recent {} gone", pos - r);
                    }
                    p.start_prompt_chunk(end + chunk);
                }
            }
        }

        /// With `observe=N` a prompt's trim keeps what the plain policy keeps when the window's
        /// attention is proportional to the accumulated scores (the fold only rescales them),
        /// never more than the budget, and its recent window.
        #[test]
        fn observation_windows_fold_into_the_sums(
            h2o in any::<bool>(), prompt in 2usize..40, budget_frac in 1usize..100, window in 1usize..8,
            seed in any::<u64>(), proportional in any::<bool>(),
        ) {
            let kind = if h2o { PolicyKind::H2o } else { PolicyKind::Keyformer };
            let budget = (prompt * budget_frac / 100).max(1);
            let base = PolicyConfig { kind, budget: Some(Amount::Tokens(budget)), seed, ..Default::default() };
            let observing = PolicyConfig { observe: Some(window), ..base.clone() };
            let (mut plain, mut mixed) = (base.resolve(prompt, 4, 1, 1).unwrap(), observing.resolve(prompt, 4, 1, 1).unwrap());
            prop_assert_eq!(plain.observation_signal(), Signal::None);
            prop_assert_eq!(
                mixed.observation_signal(),
                Signal::Attention { from_position: prompt.saturating_sub(window) as u32 }
            );
            let mut t = SlotTable::new(prompt);
            let mut rng = seed | 1;
            for pos in 0..prompt as u32 {
                let slot = t.insert(pos).unwrap();
                plain.on_insert(0, 0, slot, &[1.0]);
                mixed.on_insert(0, 0, slot, &[1.0]);
            }
            let row = random_scores(&mut rng, prompt, 1000);
            plain.observe(0, 0, &row);
            mixed.observe(0, 0, &row);
            let window_row: Vec<f32> = if proportional {
                row.iter().map(|v| v * 0.25).collect()
            } else {
                random_scores(&mut rng, prompt, 1000)
            };
            mixed.observe_window(0, 0, &window_row);
            mixed.fold_observation(0);
            let (a, b) = (plain.victims(0, 0, &t, budget), mixed.victims(0, 0, &t, budget));
            prop_assert_eq!(b.len(), prompt.saturating_sub(budget));
            if proportional {
                prop_assert_eq!(&a, &b);
            }
            let kept: Vec<u32> = t.occupied().filter(|(s, _)| !b.contains(s)).map(|(_, p)| p).collect();
            for r in 0..mixed.recent.min(kept.len()) as u32 {
                prop_assert!(kept.contains(&(prompt as u32 - 1 - r)));
            }
        }

        /// Decode-style steps with random scores (every policy but `full`, which never evicts):
        /// after every step no table holds more than the
        /// budget, the recent window is intact, evicted positions never return, and positions
        /// stay attached to their slots.
        #[test]
        fn invariants_hold_for_every_policy(
            kind_i in 1usize..9, budget in 1usize..12, recent_frac in 0usize..=100,
            steps in 1usize..40, seed in any::<u64>(),
            pinned in 0usize..3, mean in any::<bool>(), value_weighted in any::<bool>(),
            key_diversity in any::<bool>(),
        ) {
            let kind = PolicyKind::ALL[kind_i];
            let recent = budget * recent_frac / 100;
            // The composable settings on every policy (pinned sinks where they fit).
            let own_recent = if kind == PolicyKind::SnapKv { recent.max(1).min(budget) } else { recent };
            let pinned = pinned.min(budget - own_recent);
            let cfg = PolicyConfig {
                kind, budget: Some(Amount::Tokens(budget)), recent: Some(Amount::Tokens(recent)),
                sinks: budget.min(2), snapkv_window: recent.max(1), seed, pinned_sinks: pinned,
                accumulate: if mean { Accumulate::Mean } else { Accumulate::Sum }, value_weighted,
                key_diversity, ..Default::default()
            };
            let mut p = cfg.resolve(budget, steps, 1, 1).unwrap();
            let mut t = SlotTable::new(budget + 1);
            let mut evicted = std::collections::HashSet::new();
            let mut rng = seed | 1;
            for pos in 0..(budget + steps) as u32 {
                let slot = t.insert(pos).unwrap();
                p.on_insert_kv(0, 0, slot, &[pos as f32 % 3.0], &[(pos % 5) as f32 + 0.5]);
                let row = random_scores(&mut rng, t.high_water(), 100);
                p.observe(0, 0, &row);
                if pos as usize + 1 == budget {
                    if p.wants_mean_keys() {
                        p.set_mean_key(0, 0, &[1.0]);
                        for (slot, q) in t.occupied() { p.weigh_key(0, 0, slot, &[q as f32 % 3.0 - 1.0]); }
                    }
                    p.finish_prompt(&[&t]);
                    continue;
                }
                if !p.prompt_done() { continue; }
                let before: Vec<(usize, u32)> = t.occupied().collect();
                // The one-pass decode path chooses what the general selection chooses.
                prop_assert_eq!(p.victims(0, 0, &t, p.budget), p.victims_by_selection(0, 0, &t, p.budget));
                for v in p.victims(0, 0, &t, p.budget) {
                    let gone = t.evict(v).unwrap();
                    p.on_evict(0, 0, v);
                    prop_assert!(evicted.insert(gone));
                }
                p.next_step();
                let held: Vec<u32> = t.occupied().map(|(_, q)| q).collect();
                prop_assert!(held.len() <= budget);
                let newest = pos;
                for r in 0..p.recent.min(held.len()) as u32 {
                    prop_assert!(held.contains(&(newest - r)), "recent token {} evicted", newest - r);
                }
                for (s, q) in t.occupied() {
                    prop_assert!(!evicted.contains(&q));
                    prop_assert!(before.contains(&(s, q)) || q == pos);
                }
                if kind == PolicyKind::Sink {
                    for sink in 0..cfg.sinks.min(held.len()) as u32 { prop_assert!(held.contains(&sink)); }
                } else if kind != PolicyKind::Window {
                    for sink in 0..pinned.min(held.len()) as u32 { prop_assert!(held.contains(&sink), "pinned {sink} evicted"); }
                }
            }
        }
    }
}
