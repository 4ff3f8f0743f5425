//! The series budget: at most `cap` process series per metric. Past it, the least active
//! series (by activity since the previous scrape) fold into one overflow series
//! (`comm="_other"`), so sums over a metric stay exact.
//!
//! Every counter stays monotonic: a folded series' value moves into `_other` and stays there;
//! a series that becomes busy again is shown again, counting from what it had when it came
//! back (what it did while folded stays in `_other`). A visible series keeps its place against
//! a folded one unless the folded one was more than twice as active, so near-equal series do
//! not flap between the two.

use std::collections::HashMap;

use super::{Counters, SeriesKey};

#[derive(Debug)]
struct KeyState<V> {
    visible: bool,
    /// The part of the key's value that belongs to `_other` (what it had when it was shown
    /// again after being folded).
    offset: V,
    /// The key's value at the last `apply`.
    last: V,
}

#[derive(Debug)]
pub struct Budget<V> {
    cap: usize,
    keys: HashMap<SeriesKey, KeyState<V>>,
    /// What keys that have since expired (or restarted) left in `_other`, by fold class.
    retired: HashMap<u32, V>,
    /// Series folded so far (`stallwatch_series_overflow_total`).
    pub overflowed: u64,
}

impl<V: Counters> Budget<V> {
    /// `cap == 0`: no cap.
    pub fn new(cap: usize) -> Self {
        Budget {
            cap,
            keys: HashMap::new(),
            retired: HashMap::new(),
            overflowed: 0,
        }
    }

    /// Keys currently folded into the overflow series.
    #[cfg(test)]
    pub fn folded(&self) -> usize {
        self.keys.values().filter(|k| !k.visible).count()
    }

    fn retire(retired: &mut HashMap<u32, V>, st: &KeyState<V>) {
        let part = if st.visible { &st.offset } else { &st.last };
        if *part != V::zero() {
            retired
                .entry(part.fold_class())
                .or_insert_with(V::zero)
                .add(part);
        }
    }

    /// Caps `series` (every series of one metric, as the aggregator has them now). The result
    /// is sorted by key; overflow series (one per fold class) sort among them.
    pub fn apply(&mut self, series: Vec<(SeriesKey, V)>) -> Vec<(SeriesKey, V)> {
        if self.cap == 0 {
            return series;
        }
        let present: HashMap<SeriesKey, V> = series.into_iter().collect();
        // Keys that expired, or whose value went backwards (the aggregator dropped the series
        // and made a new one between two scrapes): what they had in `_other` stays there, and
        // a restarted key starts over as a new one.
        let retired = &mut self.retired;
        self.keys.retain(|k, st| {
            let keep = present
                .get(k)
                .is_some_and(|now| now.checked_sub(&st.last).is_some());
            if !keep {
                Self::retire(retired, st);
            }
            keep
        });
        super::process::shrink(&mut self.keys);
        // Rank by activity since the last apply; visible keys count double (hysteresis),
        // then visible first, then by key so the choice is deterministic.
        let mut ranked: Vec<(&SeriesKey, u64, bool)> = present
            .iter()
            .map(|(k, v)| {
                let (was_visible, before) = self
                    .keys
                    .get(k)
                    .map_or((false, 0), |st| (st.visible, st.last.activity()));
                let recent = v.activity().saturating_sub(before);
                let score = if was_visible {
                    recent.saturating_mul(2)
                } else {
                    recent
                };
                (k, score, was_visible)
            })
            .collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(b.0)));
        let mut out = Vec::with_capacity(ranked.len().min(self.cap) + 1);
        let mut other = self.retired.clone();
        let mut folded_any = false;
        for (rank, (k, _, _)) in ranked.into_iter().enumerate() {
            let now = present[k].clone();
            let show = rank < self.cap;
            let st = match self.keys.entry(k.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    if !show {
                        self.overflowed += 1; // folded at first sight
                    }
                    e.insert(KeyState {
                        visible: show,
                        offset: V::zero(),
                        last: V::zero(),
                    })
                }
            };
            if show && !st.visible {
                // Back from `_other`: shown from here on, what it had stays in `_other`.
                st.offset = now.clone();
            }
            if !show && st.visible {
                self.overflowed += 1;
            }
            st.visible = show;
            let class = now.fold_class();
            if show {
                if st.offset != V::zero() {
                    other.entry(class).or_insert_with(V::zero).add(&st.offset);
                }
                let shown = now.checked_sub(&st.offset).unwrap_or_else(V::zero);
                out.push((k.clone(), shown));
            } else {
                other.entry(class).or_insert_with(V::zero).add(&now);
                folded_any = true;
            }
            st.last = now;
        }
        if folded_any || !other.is_empty() {
            let mut classes: Vec<_> = other.into_iter().collect();
            classes.sort_by_key(|(c, _)| *c);
            out.extend(classes.into_iter().map(|(_, v)| (SeriesKey::overflow(), v)));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::process::{Owner, OVERFLOW_COMM};
    use stallwatch_common::sched::SchedStats;

    fn key(comm: &str) -> SeriesKey {
        SeriesKey {
            comm: comm.into(),
            cgroup: "/".into(),
            owner: Owner::default(),
            pid: None,
        }
    }

    fn v(n: u64) -> SchedStats {
        let mut s = SchedStats::ZERO;
        s.cswch_voluntary = n;
        s
    }

    fn total(series: &[(SeriesKey, SchedStats)]) -> u64 {
        series.iter().map(|(_, s)| s.cswch_voluntary).sum()
    }

    fn value(series: &[(SeriesKey, SchedStats)], comm: &str) -> Option<u64> {
        series
            .iter()
            .find(|(k, _)| k.comm == comm)
            .map(|(_, s)| s.cswch_voluntary)
    }

    #[test]
    fn under_the_cap_nothing_changes() {
        let mut b = Budget::new(3);
        let input = vec![(key("a"), v(1)), (key("b"), v(2))];
        assert_eq!(b.apply(input.clone()), input);
        assert_eq!(b.overflowed, 0);
        let mut unlimited = Budget::new(0);
        let many: Vec<_> = (0..100).map(|i| (key(&format!("p{i:03}")), v(i))).collect();
        assert_eq!(unlimited.apply(many.clone()), many);
    }

    #[test]
    fn past_the_cap_the_least_active_fold_and_totals_stay_exact() {
        let mut b = Budget::new(10);
        let input: Vec<_> = (0..30)
            .map(|i| (key(&format!("p{i:02}")), v(i + 1)))
            .collect();
        let out = b.apply(input.clone());
        assert_eq!(out.len(), 11);
        assert_eq!(total(&out), total(&input));
        // The 10 most active (p20..p29) keep their series.
        assert_eq!(value(&out, "p29"), Some(30));
        assert_eq!(value(&out, "p19"), None);
        assert_eq!(value(&out, OVERFLOW_COMM), Some((1..=20).sum()));
        assert_eq!(b.overflowed, 20);
    }

    #[test]
    fn every_series_stays_monotonic_as_keys_fold_and_come_back() {
        let mut b = Budget::new(1);
        let out = b.apply(vec![(key("a"), v(10)), (key("b"), v(5))]);
        assert_eq!(value(&out, "a"), Some(10));
        assert_eq!(value(&out, OVERFLOW_COMM), Some(5));
        // b gets busy (495 more against a's 0): it is shown again, counting from its return;
        // what it had stays in _other, and a's 10 joins it.
        let out = b.apply(vec![(key("a"), v(10)), (key("b"), v(500))]);
        assert_eq!(value(&out, "a"), None);
        assert_eq!(value(&out, "b"), Some(0));
        assert_eq!(value(&out, OVERFLOW_COMM), Some(510));
        assert_eq!(total(&out), 510);
        let out = b.apply(vec![(key("a"), v(11)), (key("b"), v(520))]);
        assert_eq!(value(&out, "b"), Some(20));
        assert_eq!(value(&out, OVERFLOW_COMM), Some(511));
        // A folded key whose series expires: what it had stays in _other.
        let out = b.apply(vec![(key("b"), v(530))]);
        assert_eq!(value(&out, OVERFLOW_COMM), Some(511));
        assert_eq!(total(&out), 511 + 30);
        assert_eq!(b.overflowed, 2);
        assert_eq!(b.folded(), 0);
    }

    #[test]
    fn a_key_whose_value_went_backwards_starts_over_and_other_stays_monotonic() {
        let mut b = Budget::new(1);
        b.apply(vec![(key("a"), v(100)), (key("b"), v(50))]);
        // b's series was dropped and made again between two scrapes: smaller value.
        let out = b.apply(vec![(key("a"), v(110)), (key("b"), v(3))]);
        assert_eq!(value(&out, OVERFLOW_COMM), Some(53));
        let out = b.apply(vec![(key("a"), v(120)), (key("b"), v(4))]);
        assert_eq!(value(&out, OVERFLOW_COMM), Some(54));
    }

    #[test]
    fn idle_folded_keys_are_counted_once() {
        let mut b = Budget::new(1);
        for _ in 0..5 {
            b.apply(vec![(key("a"), v(1)), (key("b"), v(0))]);
        }
        assert_eq!(b.overflowed, 1);
    }

    #[test]
    fn runtimes_fold_into_an_overflow_series_each() {
        use stallwatch_common::gc::GcStats;
        let gc = |runtime: u32, pauses: u64| {
            let mut s = GcStats::ZERO;
            s.runtime = runtime;
            for _ in 0..pauses {
                s.pause[0].observe(1000);
            }
            s
        };
        let mut b = Budget::new(1);
        let out = b.apply(vec![
            (key("go"), gc(1, 10)),
            (key("jvm"), gc(2, 3)),
            (key("py"), gc(3, 2)),
        ]);
        let others: Vec<(u32, u64)> = out
            .iter()
            .filter(|(k, _)| k.comm == OVERFLOW_COMM)
            .map(|(_, s)| (s.runtime, s.pause[0].count()))
            .collect();
        assert_eq!(others, vec![(2, 3), (3, 2)]);
    }

    #[test]
    fn near_equal_series_do_not_flap() {
        let mut b = Budget::new(1);
        b.apply(vec![(key("a"), v(10)), (key("b"), v(9))]);
        // b did a bit more than a since, but not twice as much: a keeps its place.
        let out = b.apply(vec![(key("a"), v(20)), (key("b"), v(24))]);
        assert_eq!(value(&out, "a"), Some(20));
        assert_eq!(b.overflowed, 1);
    }

    #[test]
    fn recent_activity_beats_an_old_total() {
        let mut b = Budget::new(2);
        b.apply(vec![(key("old"), v(1000)), (key("mid"), v(10))]);
        // "old" did nothing since; "new" did 50 and "mid" 40: "old" folds.
        let out = b.apply(vec![
            (key("old"), v(1000)),
            (key("mid"), v(50)),
            (key("new"), v(50)),
        ]);
        assert_eq!(value(&out, "old"), None);
        assert_eq!(value(&out, "mid"), Some(50));
        assert_eq!(value(&out, OVERFLOW_COMM), Some(1000));
        assert_eq!(out.len(), 3);
    }
}
