//! Runtime-pause (`gc`) probe ABI: which processes are watched, pauses in flight, and the
//! per-process pause histograms.

use crate::hist::Hist;

/// `GcStats::runtime`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Runtime {
    Go = 1,
    Jvm = 2,
    Python = 3,
    Node = 4,
}

pub const NUM_RUNTIMES: usize = 4;

impl Runtime {
    pub const ALL: [Runtime; NUM_RUNTIMES] =
        [Runtime::Go, Runtime::Jvm, Runtime::Python, Runtime::Node];

    pub fn from_u32(v: u32) -> Option<Runtime> {
        Runtime::ALL.into_iter().find(|r| *r as u32 == v)
    }

    /// The `runtime` label.
    pub const fn label(self) -> &'static str {
        match self {
            Runtime::Go => "go",
            Runtime::Jvm => "jvm",
            Runtime::Python => "python",
            Runtime::Node => "node",
        }
    }
}

/// Why the world stopped, `GcStats::pause` index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// A garbage collection (Go sweep/mark termination, a JVM safepoint that ran a GC, a
    /// CPython or V8 collection).
    Gc = 0,
    /// Anything else that stopped the world (Go ReadMemStats or GOMAXPROCS, JVM deoptimisation,
    /// biased-lock revocation, ...).
    Other = 1,
    /// The runtime does not say (Go 1.19 and 1.20 pass no reason).
    Unknown = 2,
}

pub const NUM_CAUSES: usize = 3;

impl Cause {
    pub const ALL: [Cause; NUM_CAUSES] = [Cause::Gc, Cause::Other, Cause::Unknown];

    pub const fn label(self) -> &'static str {
        match self {
            Cause::Gc => "gc",
            Cause::Other => "other",
            Cause::Unknown => "unknown",
        }
    }
}

/// Go's `stwReason` values that are garbage collections (stwGCMarkTerm, stwGCSweepTerm; the
/// same in Go 1.21 through 1.27).
pub const GO_STW_GC_MARK_TERM: u64 = 1;
pub const GO_STW_GC_SWEEP_TERM: u64 = 2;

/// `Inflight::reason` when the runtime gave none.
pub const REASON_NONE: u64 = u64::MAX;

/// A pause that has begun: keyed by tgid for stop-the-world pauses (one at a time per
/// process), by pid_tgid for per-thread collections (CPython, V8).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inflight {
    /// When the runtime started stopping the world (its own clock where it passes it: Go
    /// uses CLOCK_MONOTONIC, the same clock as `bpf_ktime_get_ns`).
    pub start_ns: u64,
    /// When every thread had stopped (0: not known).
    pub stopped_ns: u64,
    /// Go's stwReason, or `REASON_NONE`; JVM: 1 once a GC ran inside the safepoint.
    pub reason: u64,
    /// Nesting depth of per-thread collections.
    pub depth: u64,
    /// Go ≤1.21 mark termination: the runtime's own end of the pause, which it reads before
    /// it restarts the world (0: the pause ends at `startTheWorldWithSema`'s return value).
    pub restart_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Inflight>() == 40);

/// `Inflight::reason` for a JVM safepoint during which a GC began (USDT hotspot:gc__begin).
pub const JVM_REASON_GC: u64 = 1;

/// Per-process pauses (`HashMap<u32, GcStats>`, created by the agent, updated atomically by
/// the programs: pauses are rare, so one shared entry beats a per-CPU copy).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcStats {
    /// `Runtime` of the process (set by the agent when it creates the entry).
    pub runtime: u32,
    pub _pad: u32,
    /// Pause durations by `Cause`.
    pub pause: [Hist; NUM_CAUSES],
    /// Time to stop the world (Go ≥1.22's stopping phase, JVM's time to reach the safepoint).
    pub stop: Hist,
}

const _: () = assert!(core::mem::size_of::<GcStats>() == 8 + (NUM_CAUSES + 1) * 29 * 8);

impl GcStats {
    pub const ZERO: GcStats = GcStats {
        runtime: 0,
        _pad: 0,
        pause: [Hist::ZERO; NUM_CAUSES],
        stop: Hist::ZERO,
    };

    /// Sums `other` into `self`; the runtime is kept from whichever has one.
    pub fn add(&mut self, other: &GcStats) {
        if self.runtime == 0 {
            self.runtime = other.runtime;
        }
        for (a, b) in self.pause.iter_mut().zip(other.pause.iter()) {
            a.add(b);
        }
        self.stop.add(&other.stop);
    }

    /// `self - base`, or `None` if anything went backwards.
    pub fn checked_sub(&self, base: &GcStats) -> Option<GcStats> {
        let mut out = GcStats {
            runtime: self.runtime,
            stop: self.stop.checked_sub(&base.stop)?,
            ..GcStats::ZERO
        };
        for i in 0..NUM_CAUSES {
            out.pause[i] = self.pause[i].checked_sub(&base.pause[i])?;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_then_sub_round_trips_and_keeps_the_runtime() {
        let mut a = GcStats::ZERO;
        a.runtime = Runtime::Go as u32;
        a.pause[Cause::Gc as usize].observe(40_000);
        let mut b = GcStats::ZERO;
        b.pause[Cause::Other as usize].observe(7_000);
        b.stop.observe(3_000);
        let mut sum = a;
        sum.add(&b);
        assert_eq!(sum.runtime, Runtime::Go as u32);
        assert_eq!(sum.pause[Cause::Gc as usize].sum_ns, 40_000);
        assert_eq!(sum.checked_sub(&a).unwrap().pause, b.pause);
        assert!(a.checked_sub(&sum).is_none());
    }

    #[test]
    fn runtimes_round_trip_through_their_values() {
        for r in Runtime::ALL {
            assert_eq!(Runtime::from_u32(r as u32), Some(r));
        }
        assert_eq!(Runtime::from_u32(0), None);
    }
}
