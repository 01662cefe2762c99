//! The id allocators of the maps: backend ids and service counter ids
//! ([`IdPool`]: ids `1..capacity`, freed ones handed out again, with a note
//! of which ids may still hold old counters) and slot-set ids ([`SetIds`]: a
//! counter that only looks at the live sets after it wraps). Id 0 is never
//! handed out: it means "none" in the maps.
use std::collections::{HashSet, VecDeque};

/// Which freed id an [`IdPool`] hands out first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// The one freed longest ago (and the lowest of those adopted).
    Oldest,
    /// The one freed last (and the highest of those adopted).
    Newest,
}

/// An id just handed out by an [`IdPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocated {
    pub id: u32,
    /// The id may have been handed out before in the maps' life, so its
    /// counters may hold old counts: zero them before first use.
    pub used_before: bool,
}

/// Ids `1..capacity`: freed ones are handed out again before new ones.
#[derive(Debug)]
pub struct IdPool {
    reuse: Reuse,
    /// Freed ids, the next one to hand out at the front.
    free: VecDeque<u32>,
    /// The lowest id never handed out.
    next: u32,
    /// Ids from here up were never handed out in the maps' life, so their
    /// counters are still zero (u32::MAX: unknown, zero every time).
    fresh_from: u32,
}

impl IdPool {
    /// Takes over the ids `in_use` in adopted maps (0 is ignored): new ids
    /// count up from above the highest, and the ones below it not in use
    /// are free. `fresh`: the maps were created empty by this agent, so no
    /// id was handed out before.
    pub fn adopt(reuse: Reuse, in_use: impl IntoIterator<Item = u32>, fresh: bool) -> Self {
        let in_use: HashSet<u32> = in_use.into_iter().filter(|&id| id != 0).collect();
        let max = in_use.iter().copied().max().unwrap_or(0);
        let mut free: VecDeque<u32> = (1..max).filter(|id| !in_use.contains(id)).collect();
        if reuse == Reuse::Newest {
            free.make_contiguous().reverse();
        }
        Self {
            reuse,
            free,
            next: max + 1,
            fresh_from: if fresh { 1 } else { u32::MAX },
        }
    }

    /// A free id below `capacity`, or None when all are in use.
    pub fn alloc(&mut self, capacity: u32) -> Option<Allocated> {
        let id = match self.free.pop_front() {
            Some(id) => id,
            None if self.next < capacity => {
                self.next += 1;
                self.next - 1
            }
            None => return None,
        };
        let used_before = id < self.fresh_from;
        self.fresh_from = self.fresh_from.max(id + 1);
        Some(Allocated { id, used_before })
    }

    /// Frees an id no longer in use.
    pub fn free(&mut self, id: u32) {
        match self.reuse {
            Reuse::Oldest => self.free.push_back(id),
            Reuse::Newest => self.free.push_front(id),
        }
    }

    /// Returns an id just allocated and never used: it is the next one
    /// handed out.
    pub fn give_back(&mut self, id: u32) {
        self.free.push_front(id);
    }
}

/// Slot-set ids count up from above every adopted one, so none below
/// `next` is handed out twice until the counter wraps (after 2^32
/// changes); only then are live sets looked up, which is O(services) per
/// call and would make a full sync quadratic.
#[derive(Debug)]
pub struct SetIds {
    next: u32,
    wrapped: bool,
}

impl SetIds {
    /// Counts up from above `max_in_use`, the highest set id in the maps.
    pub fn adopt(max_in_use: u32) -> Self {
        Self {
            next: max_in_use.wrapping_add(1).max(1),
            wrapped: max_in_use == u32::MAX,
        }
    }

    /// The next set id; `in_use` (the live sets) is asked only after the
    /// counter wrapped.
    pub fn alloc(&mut self, in_use: impl FnOnce() -> HashSet<u32>) -> u32 {
        let in_use = if self.wrapped {
            in_use()
        } else {
            HashSet::new()
        };
        loop {
            let s = self.next;
            self.next = self.next.wrapping_add(1);
            if self.next == 0 {
                self.next = 1;
                self.wrapped = true;
            }
            if !in_use.contains(&s) {
                return s;
            }
        }
    }

    #[cfg(test)]
    pub fn wrapped(&self) -> bool {
        self.wrapped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(p: &mut IdPool, cap: u32, n: usize) -> Vec<u32> {
        (0..n).filter_map(|_| p.alloc(cap).map(|a| a.id)).collect()
    }

    #[test]
    fn a_pool_counts_up_to_its_capacity() {
        let mut p = IdPool::adopt(Reuse::Oldest, [], false);
        assert_eq!(ids(&mut p, 4, 5), [1, 2, 3], "ids are 1..capacity");
        assert_eq!(p.alloc(4), None);
        p.free(2);
        assert_eq!(ids(&mut p, 4, 2), [2]);
    }

    #[test]
    fn freed_ids_come_back_oldest_or_newest_first() {
        for (reuse, want) in [(Reuse::Oldest, [2, 4, 3]), (Reuse::Newest, [3, 4, 2])] {
            let mut p = IdPool::adopt(reuse, [], false);
            assert_eq!(ids(&mut p, 100, 5), [1, 2, 3, 4, 5]);
            p.free(2);
            p.free(4);
            p.free(3);
            assert_eq!(ids(&mut p, 100, 3), want, "{reuse:?}");
            assert_eq!(ids(&mut p, 100, 1), [6], "then new ones");
        }
    }

    #[test]
    fn a_given_back_id_is_the_next_one() {
        let mut p = IdPool::adopt(Reuse::Oldest, [], false);
        assert_eq!(ids(&mut p, 100, 3), [1, 2, 3]);
        p.free(1);
        p.give_back(3);
        assert_eq!(ids(&mut p, 100, 2), [3, 1]);
    }

    #[test]
    fn adopted_ids_leave_the_gaps_free() {
        let mut p = IdPool::adopt(Reuse::Oldest, [0, 5, 2], false);
        assert_eq!(ids(&mut p, 100, 4), [1, 3, 4, 6]);
        let mut p = IdPool::adopt(Reuse::Newest, [5, 2], false);
        assert_eq!(ids(&mut p, 100, 4), [4, 3, 1, 6]);
    }

    #[test]
    fn only_ids_of_fresh_maps_never_handed_out_are_known_zeroed() {
        let mut p = IdPool::adopt(Reuse::Oldest, [], true);
        let a = p.alloc(100).unwrap();
        assert_eq!((a.id, a.used_before), (1, false));
        p.free(1);
        assert!(p.alloc(100).unwrap().used_before, "1 comes back");
        assert!(!p.alloc(100).unwrap().used_before, "2 is new");
        // Adopted maps: any id may hold old counts.
        let mut p = IdPool::adopt(Reuse::Oldest, [], false);
        assert!(p.alloc(100).unwrap().used_before);
    }

    #[test]
    fn set_ids_skip_live_sets_only_after_wrapping() {
        let mut s = SetIds::adopt(7);
        assert_eq!(s.alloc(|| unreachable!("not wrapped")), 8);
        let mut s = SetIds::adopt(u32::MAX - 1);
        assert_eq!(s.alloc(|| unreachable!("not wrapped")), u32::MAX);
        assert!(s.wrapped());
        assert_eq!(s.alloc(|| HashSet::from([1, 2])), 3, "0 is never used");
        let mut s = SetIds::adopt(u32::MAX);
        assert!(s.wrapped());
        assert_eq!(s.alloc(|| HashSet::from([1])), 2);
        assert_eq!(SetIds::adopt(0).alloc(HashSet::new), 1);
    }
}
