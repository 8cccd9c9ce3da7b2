//! Compressed prompt prefixes kept for reuse: a copy of a sequence's cache taken in the middle
//! of its prompt starts a later sequence whose prompt begins with the same tokens under the same
//! policy, which then computes only the rest (a system prompt shared by many requests, a chat's
//! next turn repeating the conversation so far).
//!
//! A copy is taken only where it gives exactly what the later sequence's own prefill would
//! ([`SequencePolicy::reuse_key`](keyformer_kv::SequencePolicy::reuse_key)): anywhere in a
//! full-cache prompt (at multiples of 64 tokens), and at the chunk boundaries of a prompt
//! trimmed chunk by chunk, just after the trim. Which positions: where the prompt stops sharing
//! its tokens with a recent prompt (the shared system prompt), and the last boundary before its
//! end (the next turn of the same chat). Copies are evicted least recently used under a memory
//! limit.

use std::collections::VecDeque;

use crate::backend::SequenceCache;

/// Prompts remembered to find the prefixes they share with new ones.
const RECENT_PROMPTS: usize = 32;

/// What the prefix cache has done (for `/metrics`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PrefixStats {
    /// Prompts that started from a kept prefix.
    pub hits: u64,
    /// Prompts that could have, but found none.
    pub misses: u64,
    /// Prompt tokens not computed thanks to a hit.
    pub tokens_reused: u64,
    /// Key and value bytes the kept prefixes hold.
    pub bytes_held: usize,
    pub entries: usize,
}

struct Entry<C> {
    key: String,
    tokens: Vec<u32>,
    cache: C,
    bytes: usize,
    used: u64,
}

/// Kept prefixes of one model, each a cache of backend type `C`.
pub struct PrefixCache<C> {
    limit: usize,
    entries: Vec<Entry<C>>,
    recent: VecDeque<Vec<u32>>,
    clock: u64,
    stats: PrefixStats,
}

impl<C: SequenceCache> PrefixCache<C> {
    /// A cache of prefixes holding at most `limit` bytes of keys and values (0: keep none).
    pub fn new(limit: usize) -> Self {
        Self { limit, entries: Vec::new(), recent: VecDeque::new(), clock: 0, stats: PrefixStats::default() }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn stats(&self) -> &PrefixStats {
        &self.stats
    }

    pub fn bytes_held(&self) -> usize {
        self.stats.bytes_held
    }

    /// The longest kept prefix of `prompt` (leaving at least one token to compute) under `key`:
    /// its length and a copy of its cache (made by `copy`). Counts a hit or a miss.
    pub fn lookup(&mut self, key: &str, prompt: &[u32], copy: impl Fn(&C) -> Option<C>) -> Option<(usize, C)> {
        if self.limit == 0 {
            return None;
        }
        self.clock += 1;
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.key == key && e.tokens.len() < prompt.len() && prompt.starts_with(&e.tokens))
            .max_by_key(|e| e.tokens.len());
        match best.and_then(|e| copy(&e.cache).map(|c| (e, c))) {
            Some((e, cache)) => {
                e.used = self.clock;
                self.stats.hits += 1;
                self.stats.tokens_reused += e.tokens.len() as u64;
                Some((e.tokens.len(), cache))
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Prompt positions of `prompt` worth keeping a copy at, past `from` (where its prefill
    /// starts), at multiples of `step`: where it stops sharing tokens with a recent prompt, and
    /// the last such multiple before its end. Positions already kept are left out.
    pub fn breaks(&self, key: &str, prompt: &[u32], step: usize, from: usize) -> Vec<usize> {
        if self.limit == 0 || step == 0 {
            return Vec::new();
        }
        let shared =
            self.recent.iter().map(|p| p.iter().zip(prompt).take_while(|(a, b)| a == b).count()).max().unwrap_or(0);
        let mut at: Vec<usize> = [shared.min(prompt.len() - 1), prompt.len() - 1]
            .into_iter()
            .map(|n| n / step * step)
            .filter(|&b| b > from)
            .filter(|&b| {
                !self.entries.iter().any(|e| e.key == key && e.tokens.len() == b && prompt.starts_with(&e.tokens))
            })
            .collect();
        at.dedup();
        at
    }

    /// Remember `prompt` for finding shared prefixes later.
    pub fn remember(&mut self, prompt: &[u32]) {
        if self.limit == 0 {
            return;
        }
        if self.recent.len() == RECENT_PROMPTS {
            self.recent.pop_front();
        }
        self.recent.push_back(prompt.to_vec());
    }

    /// Keep `cache`, the state after `tokens` under `key`, evicting the least recently used
    /// copies to stay within the limit (a copy larger than the limit is not kept).
    pub fn insert(&mut self, key: &str, tokens: &[u32], cache: C) {
        let bytes = cache.bytes_held();
        if bytes > self.limit {
            return;
        }
        self.entries.retain(|e| !(e.key == key && e.tokens == tokens));
        self.clock += 1;
        self.entries.push(Entry { key: key.to_string(), tokens: tokens.to_vec(), cache, bytes, used: self.clock });
        self.shrink_to(self.limit);
    }

    /// Evict least recently used copies until at most `bytes` are held (the server makes room
    /// for a request this way).
    pub fn shrink_to(&mut self, bytes: usize) {
        self.entries.sort_by_key(|e| std::cmp::Reverse(e.used));
        let mut held = 0;
        self.entries.retain(|e| {
            let keep = held + e.bytes <= bytes;
            held += if keep { e.bytes } else { 0 };
            keep
        });
        self.stats.bytes_held = self.entries.iter().map(|e| e.bytes).sum();
        self.stats.entries = self.entries.len();
    }
}
