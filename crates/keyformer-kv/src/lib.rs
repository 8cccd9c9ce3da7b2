//! KV-cache bookkeeping for keyformer, with no tensor types.
//!
//! Like llama.cpp's KV cells, the cache's metadata lives apart from the tensors: a
//! [`SlotTable`] says, for one (sequence, layer, KV head), which storage slots hold a token and
//! at which ORIGINAL position (Keyformer keeps original positions: the spec, "Details that
//! matter", and the paper's Table 3). Evicting a token frees its slot and the next token reuses
//! it, so a backend never copies the cache to drop an entry. Eviction policies ([`policy`]) are
//! written against this table and per-slot scores only; [`noise`] is Keyformer's reproducible
//! noise; [`expected`] models the queries to come for the expected-attention score.

pub mod cursor;
pub mod expected;
pub mod noise;
pub mod policy;

pub use cursor::{CursorFull, EvictRange, SlotCursor, StepPlan};
pub use noise::NoiseKind;
pub use policy::{
    Accumulate, Amount, KeyformerOptions, PolicyConfig, PolicyError, PolicyKind, ScoreNoise, SequencePolicy, Signal,
    KVZIP_SINKS,
};

/// Errors from slot bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("slot table is full (capacity {capacity})")]
    Full { capacity: usize },
    #[error("slot {0} is not occupied")]
    NotOccupied(usize),
    #[error("position {position} is not after the last inserted position {last}")]
    PositionNotIncreasing { position: u32, last: u32 },
}

/// Occupancy and original positions of the slots of one (sequence, layer, KV head).
///
/// Invariants (checked by the property tests): every occupied slot index is `< capacity`; the
/// free list holds exactly the unoccupied slots below `high_water`; inserted positions strictly
/// increase.
#[derive(Debug, Clone)]
pub struct SlotTable {
    /// `positions[slot]`: the original position held there, `None` when the slot is free.
    positions: Vec<Option<u32>>,
    /// Freed slots, reused last-freed first.
    free: Vec<usize>,
    capacity: usize,
    occupied: usize,
    last_position: Option<u32>,
}

impl SlotTable {
    /// A table that can hold at most `capacity` tokens at once.
    pub fn new(capacity: usize) -> Self {
        Self { positions: Vec::new(), free: Vec::new(), capacity, occupied: 0, last_position: None }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Number of tokens held.
    pub fn len(&self) -> usize {
        self.occupied
    }
    pub fn is_empty(&self) -> bool {
        self.occupied == 0
    }
    /// Slots ever used (the storage a backend must have allocated): occupied or free-listed.
    pub fn high_water(&self) -> usize {
        self.positions.len()
    }
    /// The position of the most recent token inserted.
    pub fn last_position(&self) -> Option<u32> {
        self.last_position
    }

    /// Continue the position order of another table (a compacted copy of this one): the next
    /// insert must come after `last` even when the token at `last` was itself evicted.
    pub fn continue_after(&mut self, last: Option<u32>) {
        self.last_position = self.last_position.max(last);
    }

    /// Place a token with original `position` in a free slot and return the slot index.
    /// Positions must increase: a token never joins the cache before an earlier one.
    pub fn insert(&mut self, position: u32) -> Result<usize, SlotError> {
        if let Some(last) = self.last_position {
            if position <= last {
                return Err(SlotError::PositionNotIncreasing { position, last });
            }
        }
        let slot = if let Some(slot) = self.free.pop() {
            slot
        } else if self.positions.len() < self.capacity {
            self.positions.push(None);
            self.positions.len() - 1
        } else {
            return Err(SlotError::Full { capacity: self.capacity });
        };
        debug_assert!(self.positions[slot].is_none());
        self.positions[slot] = Some(position);
        self.occupied += 1;
        self.last_position = Some(position);
        Ok(slot)
    }

    /// Free `slot`; its position is forgotten for good.
    pub fn evict(&mut self, slot: usize) -> Result<u32, SlotError> {
        let pos = self.positions.get_mut(slot).and_then(Option::take).ok_or(SlotError::NotOccupied(slot))?;
        self.free.push(slot);
        self.occupied -= 1;
        Ok(pos)
    }

    /// The position held in `slot`, if occupied.
    pub fn position(&self, slot: usize) -> Option<u32> {
        self.positions.get(slot).copied().flatten()
    }

    /// Per slot below [`high_water`](Self::high_water): the position, or `None` for a free slot.
    /// Backends walk this in slot order, which is the storage order of keys and values.
    pub fn positions(&self) -> &[Option<u32>] {
        &self.positions
    }

    /// Occupied `(slot, position)` pairs in slot order.
    pub fn occupied(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.positions.iter().enumerate().filter_map(|(s, p)| p.map(|p| (s, p)))
    }

    /// The positions held, ascending.
    pub fn held_positions(&self) -> Vec<u32> {
        let mut held: Vec<u32> = self.positions.iter().flatten().copied().collect();
        held.sort_unstable();
        held
    }

    /// Forget everything (a new sequence reuses the storage).
    pub fn clear(&mut self) {
        self.positions.clear();
        self.free.clear();
        self.occupied = 0;
        self.last_position = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_then_reuses_freed_slots() {
        let mut t = SlotTable::new(3);
        assert_eq!(t.insert(0), Ok(0));
        assert_eq!(t.insert(1), Ok(1));
        assert_eq!(t.insert(2), Ok(2));
        assert_eq!(t.insert(3), Err(SlotError::Full { capacity: 3 }));
        assert_eq!(t.evict(1), Ok(1));
        assert_eq!(t.insert(3), Ok(1), "the freed slot is reused");
        assert_eq!(t.positions(), &[Some(0), Some(3), Some(2)]);
        assert_eq!(t.evict(1), Ok(3));
        assert_eq!(t.evict(1), Err(SlotError::NotOccupied(1)));
        assert_eq!(t.insert(3), Err(SlotError::PositionNotIncreasing { position: 3, last: 3 }));
    }

    #[test]
    fn a_copy_continues_after_an_evicted_newest_token() {
        let mut t = SlotTable::new(4);
        t.insert(5).unwrap();
        t.insert(6).unwrap();
        t.evict(1).unwrap();
        // A compacted copy holds only position 5 but must still refuse 6 and take 7.
        let mut copy = SlotTable::new(2);
        copy.insert(5).unwrap();
        copy.continue_after(t.last_position());
        assert_eq!(copy.insert(6), Err(SlotError::PositionNotIncreasing { position: 6, last: 6 }));
        assert_eq!(copy.insert(7), Ok(1));
    }

    proptest! {
        /// Random insert/evict sequences keep the invariants and agree with a naive model
        /// (a list of live positions).
        #[test]
        fn matches_a_naive_model(cap in 1usize..16, ops in prop::collection::vec((any::<bool>(), any::<u8>()), 0..200)) {
            let mut t = SlotTable::new(cap);
            let mut live: Vec<u32> = Vec::new();
            let mut next = 0u32;
            for (insert, pick) in ops {
                if insert {
                    let r = t.insert(next);
                    if live.len() < cap {
                        let slot = r.unwrap();
                        prop_assert!(slot < cap);
                        live.push(next);
                    } else {
                        prop_assert_eq!(r, Err(SlotError::Full { capacity: cap }));
                    }
                    next += 1;
                } else if !live.is_empty() {
                    let victim = live.remove(pick as usize % live.len());
                    let slot = t.occupied().find(|&(_, p)| p == victim).unwrap().0;
                    prop_assert_eq!(t.evict(slot), Ok(victim));
                }
                prop_assert_eq!(&t.held_positions(), &live);
                prop_assert_eq!(t.len(), live.len());
                prop_assert!(t.high_water() <= cap);
            }
        }
    }
}
