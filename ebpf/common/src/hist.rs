//! Log2 latency histograms, observed in the kernel and exported as Prometheus histograms.
//!
//! Bucket `i < NUM_BUCKETS - 1` holds durations `d` with `2^(i+9) < d <= 2^(i+10)` ns (bucket 0
//! holds everything up to 1.024 µs), so its upper bound is exactly the Prometheus `le` bound
//! `2^(i+10)` ns. The last bucket holds everything above `2^(NUM_BUCKETS+8)` ns (~68.7 s): `+Inf`.

/// Finite buckets (27) plus one `+Inf` bucket.
pub const NUM_BUCKETS: usize = 28;
/// log2 of the first bucket's upper bound in nanoseconds (1024 ns).
pub const FIRST_BUCKET_SHIFT: u32 = 10;

/// A histogram as the kernel stores it: per-bucket counts (not cumulative) and the sum of
/// observations in nanoseconds. The count is the sum of the buckets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hist {
    pub buckets: [u64; NUM_BUCKETS],
    pub sum_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Hist>() == (NUM_BUCKETS + 1) * 8);

impl Hist {
    pub const ZERO: Hist = Hist {
        buckets: [0; NUM_BUCKETS],
        sum_ns: 0,
    };

    #[inline(always)]
    pub fn observe(&mut self, ns: u64) {
        let i = bucket_index(ns);
        // The clamp in bucket_index bounds `i`; the `get_mut` keeps the verifier's view explicit.
        if let Some(b) = self.buckets.get_mut(i) {
            *b += 1;
        }
        self.sum_ns += ns;
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// Upper bound of bucket `i` in nanoseconds, `None` for the `+Inf` bucket.
pub const fn bucket_upper_bound_ns(i: usize) -> Option<u64> {
    if i + 1 >= NUM_BUCKETS {
        None
    } else {
        Some(1u64 << (i as u32 + FIRST_BUCKET_SHIFT))
    }
}

/// The bucket holding a duration of `ns` nanoseconds: the smallest `i` with
/// `ns <= 2^(i + FIRST_BUCKET_SHIFT)`, clamped to the `+Inf` bucket.
///
/// Written as branchy shifts with an explicit clamp: a `leading_zeros()` version produced an
/// index the verifier could not bound.
#[inline(always)]
pub fn bucket_index(ns: u64) -> usize {
    if ns <= (1u64 << FIRST_BUCKET_SHIFT) {
        return 0;
    }
    // ceil(log2(ns)) == floor(log2(ns - 1)) + 1 for ns >= 2.
    let mut v = ns - 1;
    let mut log2: u32 = 0;
    if v >= 1 << 32 {
        v >>= 32;
        log2 += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        log2 += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        log2 += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        log2 += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        log2 += 2;
    }
    if v >= 1 << 1 {
        log2 += 1;
    }
    let idx = (log2 + 1 - FIRST_BUCKET_SHIFT) as usize;
    if idx > NUM_BUCKETS - 1 {
        NUM_BUCKETS - 1
    } else {
        idx
    }
}

/// Userspace arithmetic on kernel snapshots (sums across CPUs, deltas against a baseline).
impl Hist {
    pub fn add(&mut self, other: &Hist) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }

    /// `self - base`, or `None` if any counter went backwards (the kernel entry was recreated).
    pub fn checked_sub(&self, base: &Hist) -> Option<Hist> {
        let mut out = Hist::ZERO;
        for i in 0..NUM_BUCKETS {
            out.buckets[i] = self.buckets[i].checked_sub(base.buckets[i])?;
        }
        out.sum_ns = self.sum_ns.checked_sub(base.sum_ns)?;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn every_value_lands_in_the_bucket_whose_bounds_hold_it() {
        let mut probes = Vec::new();
        for shift in 0..64u32 {
            let p = 1u64 << shift;
            probes.extend([p - 1, p, p + 1]);
        }
        probes.extend([0, u64::MAX, 50_000_000, 10_000_000, 100_000_000]);
        for ns in probes {
            let i = bucket_index(ns);
            assert!(i < NUM_BUCKETS, "{ns} -> {i}");
            if let Some(upper) = bucket_upper_bound_ns(i) {
                assert!(ns <= upper, "{ns} above bucket {i} bound {upper}");
            }
            if i > 0 {
                let lower = bucket_upper_bound_ns(i - 1).unwrap();
                assert!(
                    ns > lower,
                    "{ns} not above bucket {}'s bound {lower}",
                    i - 1
                );
            }
        }
    }

    #[test]
    fn known_buckets() {
        assert_eq!(bucket_index(1024), 0);
        assert_eq!(bucket_index(1025), 1);
        assert_eq!(bucket_index(2048), 1);
        // 50 ms lies in (2^25, 2^26] ns.
        assert_eq!(
            bucket_upper_bound_ns(bucket_index(50_000_000)),
            Some(1 << 26)
        );
        assert_eq!(bucket_index(1 << 36), NUM_BUCKETS - 2);
        assert_eq!(bucket_index((1 << 36) + 1), NUM_BUCKETS - 1);
        assert_eq!(bucket_upper_bound_ns(NUM_BUCKETS - 1), None);
    }

    #[test]
    fn observe_counts_and_sums() {
        let mut h = Hist::ZERO;
        h.observe(10);
        h.observe(50_000_000);
        assert_eq!(h.count(), 2);
        assert_eq!(h.sum_ns, 50_000_010);
        assert_eq!(h.buckets[0], 1);
    }
}
