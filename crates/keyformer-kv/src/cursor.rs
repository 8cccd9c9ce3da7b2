//! The host's book-keeping for a KV cache whose slots live elsewhere (the GPU): how many tokens
//! each (layer, KV head) holds, which slots may hold them, where the next token goes and
//! whether the step evicts. The device applies a [`StepPlan`] and picks the victim itself
//! (lowest score outside the recent window and the sinks, ties to the oldest), so no slot index
//! comes back; this type is what keeps the host's view right, and it is tested against
//! [`SequencePolicy::victims`] on a [`SlotTable`](crate::SlotTable).
//!
//! While the prompt is processed slots fill in position order. After it is compressed to
//! `kept` tokens in slots `0..kept`, each step's token takes the next free slot until the cache
//! holds budget + 1, then the slot its predecessor's victim freed.

use crate::SequencePolicy;

/// What one decode step does to a sequence's slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    /// The new token's slot; `None`: the slot the previous step's victim freed.
    pub store_slot: Option<usize>,
    /// Slots `0..width` may hold tokens this step (attention looks at them).
    pub width: usize,
    /// Evict one token after attention.
    pub evict: Option<EvictRange>,
}

/// Which tokens a step may evict: positions in `sinks..first_recent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvictRange {
    pub first_recent: u32,
    pub sinks: u32,
}

/// The host's view of one sequence's slots (the same for every layer and KV head: each step
/// adds one token to each and evicts one from each, or none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotCursor {
    /// Slots per (layer, KV head) in the storage.
    pub capacity: usize,
    /// Tokens held.
    pub len: usize,
    /// Slots `0..width` may hold tokens.
    pub width: usize,
    /// The next token's position.
    pub next_position: u32,
    /// The cache is at its budget: the next token takes the last victim's slot.
    pub reuse_victim: bool,
}

/// The cursor was asked for more than its storage holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the context is full: {needed} tokens needed, the cache holds {capacity}")]
pub struct CursorFull {
    pub needed: usize,
    pub capacity: usize,
}

impl SlotCursor {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, len: 0, width: 0, next_position: 0, reuse_victim: false }
    }

    /// A prompt chunk of `n` tokens: its first slot and position (slots fill in order).
    pub fn prompt_chunk(&self, n: usize) -> Result<(usize, u32), CursorFull> {
        if self.len + n > self.capacity {
            return Err(CursorFull { needed: self.len + n, capacity: self.capacity });
        }
        Ok((self.len, self.next_position))
    }

    /// After a prompt chunk of `n` tokens went through every layer.
    pub fn prompt_done(&mut self, n: usize) {
        self.len += n;
        self.width = self.len;
        self.next_position += n as u32;
    }

    /// The prompt was compressed into slots `0..kept` of a storage of `capacity` slots.
    pub fn compacted(&mut self, kept: usize, capacity: usize) {
        self.capacity = capacity;
        self.len = kept;
        self.width = kept;
        self.reuse_victim = false;
    }

    /// The next decode step under `policy` (whose prompt is done).
    pub fn plan_step(&self, policy: &SequencePolicy) -> Result<StepPlan, CursorFull> {
        // StreamingLLM's sinks, or the first positions pinned for any policy.
        self.plan(policy.budget, policy.recent, policy.pinned().min(u32::MAX as u64) as u32)
    }

    /// The next decode step of a sliding-window layer attending over `window` positions: the
    /// query sees itself and the `window - 1` tokens before it, so the step ends holding those
    /// and drops the oldest (whatever the sequence's policy keeps in its global layers).
    pub fn plan_window_step(&self, window: usize) -> Result<StepPlan, CursorFull> {
        let keep = window.saturating_sub(1).max(1);
        self.plan(keep, keep, 0)
    }

    /// How many tokens a sliding-window layer keeps once the prompt is processed.
    pub fn window_kept(window: usize) -> usize {
        window.saturating_sub(1).max(1)
    }

    fn plan(&self, budget: usize, recent: usize, sinks: u32) -> Result<StepPlan, CursorFull> {
        if !self.reuse_victim && self.len >= self.capacity {
            return Err(CursorFull { needed: self.len + 1, capacity: self.capacity });
        }
        // The new token joins what is held (into the slot the last victim freed, or a new one).
        let held = self.len + 1;
        let evict = (held > budget).then(|| EvictRange {
            first_recent: (self.next_position + 1).saturating_sub(recent.min(held) as u32),
            sinks,
        });
        Ok(StepPlan {
            store_slot: (!self.reuse_victim).then_some(self.len),
            width: if self.reuse_victim { self.width } else { self.len + 1 },
            evict,
        })
    }

    /// After the step `plan` went through every layer.
    pub fn step_done(&mut self, plan: &StepPlan) {
        self.width = plan.width;
        if plan.evict.is_some() {
            self.reuse_victim = true;
        } else {
            self.len += 1;
        }
        self.next_position += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Amount, PolicyConfig, PolicyKind, SlotTable};
    use proptest::prelude::*;

    /// What the GPU does with a plan (the kernels' rule, written again): store the token, then
    /// evict the lowest (score, position) with position in sinks..first_recent.
    struct Device {
        positions: Vec<Option<u32>>,
        scores: Vec<f32>,
        victim: Option<usize>,
        /// Whether the policy keeps scores (window, sink and full have none: all rank equal).
        scored: bool,
    }

    impl Device {
        fn apply(&mut self, plan: &StepPlan, position: u32, score_of: impl Fn(u32) -> f32) {
            let slot = plan.store_slot.or(self.victim).expect("a slot for the token");
            if self.positions.len() <= slot {
                self.positions.resize(slot + 1, None);
                self.scores.resize(slot + 1, 0.0);
            }
            self.positions[slot] = Some(position);
            // Scores as a policy would have them after this step's attention.
            for (s, p) in self.positions.iter().enumerate().take(plan.width) {
                if let Some(p) = p {
                    self.scores[s] = if self.scored { score_of(*p) } else { 0.0 };
                }
            }
            if let Some(e) = plan.evict {
                let victim = (0..plan.width)
                    .filter_map(|s| self.positions[s].map(|p| (s, p)))
                    .filter(|&(_, p)| p < e.first_recent && p >= e.sinks)
                    .min_by(|a, b| self.scores[a.0].total_cmp(&self.scores[b.0]).then(a.1.cmp(&b.1)))
                    .map(|(s, _)| s);
                if let Some(v) = victim {
                    self.positions[v] = None;
                }
                self.victim = victim;
            }
        }
        fn held(&self) -> Vec<u32> {
            let mut p: Vec<u32> = self.positions.iter().flatten().copied().collect();
            p.sort_unstable();
            p
        }
    }

    fn kind_of(k: u8) -> PolicyKind {
        [PolicyKind::Full, PolicyKind::Window, PolicyKind::Sink, PolicyKind::H2o, PolicyKind::Keyformer][k as usize % 5]
    }

    proptest! {
        /// A prompt, its compression by the CPU policy, then decode steps: the cursor's plans
        /// applied by the device's rule hold exactly what the CPU policy's own eviction on a
        /// slot table holds, step after step, and never more than budget + 1 slots (pinned
        /// sinks included).
        #[test]
        fn plans_keep_what_the_cpu_policy_keeps(
            kind in 0u8..5,
            prompt in 1usize..60,
            steps in 0usize..80,
            budget_pct in 10u32..100,
            recent_pct in 0u32..100,
            pinned in 0usize..3,
            seed in any::<u64>(),
        ) {
            let kind = kind_of(kind);
            let config = PolicyConfig {
                kind,
                budget: Some(Amount::Percent(budget_pct as f64)),
                recent: Some(Amount::Percent(recent_pct as f64)),
                sinks: 2,
                pinned_sinks: pinned,
                ..PolicyConfig::default()
            };
            let Ok(mut policy) = config.resolve(prompt, steps, 1, 1) else { return Ok(()) };
            // A score per position that does not depend on the slot (distinct: no ties).
            let score_of = move |p: u32| {
                let mut z = (p as u64) ^ seed;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
                (z >> 40) as f32
            };
            let capacity = policy.capacity(prompt + steps);

            // The CPU: a slot table evicting with the policy's own code.
            let mut table = SlotTable::new(capacity);
            for p in 0..prompt as u32 {
                table.insert(p).unwrap();
            }
            let observe = |policy: &mut SequencePolicy, table: &SlotTable| {
                let per_slot: Vec<f32> =
                    table.positions().iter().map(|p| p.map_or(0.0, score_of)).collect();
                // Scores are set, not added: zero what is there, then add.
                let current = policy.scores(0, 0).to_vec();
                let delta: Vec<f32> =
                    per_slot.iter().enumerate().map(|(s, v)| v - current.get(s).copied().unwrap_or(0.0)).collect();
                policy.observe(0, 0, &delta);
            };
            observe(&mut policy, &table);
            for slot in policy.victims(0, 0, &table, policy.budget) {
                table.evict(slot).unwrap();
            }

            // The cursor and the device, from the same compressed prompt.
            let mut cursor = SlotCursor::new(capacity);
            let (start, first) = cursor.prompt_chunk(prompt).unwrap();
            prop_assert_eq!((start, first), (0, 0));
            cursor.prompt_done(prompt);
            let kept = table.held_positions();
            let mut device = Device {
                positions: kept.iter().map(|&p| Some(p)).collect(),
                scores: kept.iter().map(|&p| score_of(p)).collect(),
                victim: None,
                scored: matches!(kind, PolicyKind::H2o | PolicyKind::Keyformer),
            };
            if policy.budget < prompt {
                cursor.compacted(kept.len(), policy.budget + 1);
                // The CPU compacts too: slots in position order.
                table = SlotTable::new(policy.budget + 1);
                for &p in &kept {
                    table.insert(p).unwrap();
                }
            }
            policy.finish_prompt(&[]);

            for t in 0..steps as u32 {
                let position = prompt as u32 + t;
                let plan = cursor.plan_step(&policy).unwrap();
                device.apply(&plan, position, score_of);
                cursor.step_done(&plan);

                table.insert(position).unwrap();
                observe(&mut policy, &table);
                for slot in policy.victims(0, 0, &table, policy.budget) {
                    table.evict(slot).unwrap();
                }
                policy.next_step();

                let want = table.held_positions();
                prop_assert_eq!(device.held(), want.clone(), "step {} of {:?}", t, kind);
                prop_assert_eq!(cursor.len, want.len());
                prop_assert!(cursor.width <= cursor.capacity.max(prompt));
            }
        }
    }

    proptest! {
        /// A sliding-window layer: after the prompt (compressed to its last `window - 1`
        /// tokens when longer) and each step, the device holds exactly the positions the next
        /// query sees besides itself, `newest + 2 - window ..= newest` (what the CPU cache's
        /// `evict_outside_window` keeps), in at most `window` slots.
        #[test]
        fn window_plans_hold_what_the_next_query_sees(
            prompt in 1usize..60,
            steps in 0usize..80,
            window in 2usize..40,
        ) {
            let keep = SlotCursor::window_kept(window);
            let capacity = prompt + steps;
            let mut cursor = SlotCursor::new(capacity);
            cursor.prompt_done(prompt);
            let first = prompt.saturating_sub(keep) as u32;
            let kept: Vec<u32> = (first..prompt as u32).collect();
            if kept.len() < prompt {
                cursor.compacted(kept.len(), keep + 1);
            }
            let mut device = Device {
                positions: kept.iter().map(|&p| Some(p)).collect(),
                scores: vec![0.0; kept.len()],
                victim: None,
                scored: false,
            };
            for t in 0..steps as u32 {
                let position = prompt as u32 + t;
                let plan = cursor.plan_window_step(window).unwrap();
                device.apply(&plan, position, |_| 0.0);
                cursor.step_done(&plan);
                let oldest = (position as usize + 2).saturating_sub(window) as u32;
                let want: Vec<u32> = (oldest..=position).collect();
                prop_assert_eq!(device.held(), want.clone(), "step {}", t);
                prop_assert_eq!(cursor.len, want.len());
                prop_assert!(cursor.width <= window.max(prompt + t as usize + 1));
            }
        }
    }

    #[test]
    fn a_full_storage_is_refused_not_overrun() {
        let mut c = SlotCursor::new(3);
        assert!(c.prompt_chunk(4).is_err());
        c.prompt_done(3);
        let policy = PolicyConfig::default().resolve(3, 1, 1, 1).unwrap();
        assert_eq!(c.plan_step(&policy), Err(CursorFull { needed: 4, capacity: 3 }));
    }
}
