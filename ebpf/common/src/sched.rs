//! Scheduler probe ABI: per-thread state and aggregates, summed per process by the agent.

use crate::hist::Hist;

/// Why a thread left the CPU. Indexes [`SchedStats::offcpu`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffCpuReason {
    /// Blocked in an interruptible sleep (S), or stopped/traced: the thread chose to wait.
    Voluntary = 0,
    /// Blocked in an uninterruptible sleep (D): I/O, vfork wait, some locks.
    Uninterruptible = 1,
    /// Preempted (or yielded) while still runnable: waiting for a CPU.
    Involuntary = 2,
}

pub const NUM_OFFCPU_REASONS: usize = 3;

impl OffCpuReason {
    pub const ALL: [OffCpuReason; NUM_OFFCPU_REASONS] = [
        OffCpuReason::Voluntary,
        OffCpuReason::Uninterruptible,
        OffCpuReason::Involuntary,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            OffCpuReason::Voluntary => "voluntary",
            OffCpuReason::Uninterruptible => "uninterruptible",
            OffCpuReason::Involuntary => "involuntary",
        }
    }

    /// Classifies a switch-out the way the kernel counts `nvcsw`/`nivcsw`: a switch is
    /// voluntary when the task was not preempted and had left `TASK_RUNNING`.
    #[inline(always)]
    pub const fn classify(preempt: bool, prev_state: u32) -> OffCpuReason {
        if preempt || prev_state == TASK_RUNNING {
            OffCpuReason::Involuntary
        } else if (prev_state & TASK_UNINTERRUPTIBLE != 0 && prev_state & TASK_NOLOAD == 0)
            || prev_state & TASK_RTLOCK_WAIT != 0
        {
            // TASK_IDLE (UNINTERRUPTIBLE|NOLOAD) is an idle kernel thread, not a D-state wait;
            // a PREEMPT_RT sleeping-lock wait is one (D, as `ps` shows it).
            OffCpuReason::Uninterruptible
        } else {
            OffCpuReason::Voluntary
        }
    }
}

// Task state bits (include/linux/sched.h); stable since v4.14.
pub const TASK_RUNNING: u32 = 0x0000;
pub const TASK_UNINTERRUPTIBLE: u32 = 0x0002;
pub const TASK_DEAD: u32 = 0x0080;
pub const TASK_NOLOAD: u32 = 0x0400;
/// A PREEMPT_RT sleeping-lock wait (v5.15+). Any other nonzero state, TASK_FROZEN (0x8000,
/// v6.1+) included, is a voluntary switch as the kernel counts `nvcsw`.
pub const TASK_RTLOCK_WAIT: u32 = 0x1000;

/// Per-thread scheduling state: the first part of a thread's [`ThreadSched`] entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadState {
    /// When the thread last left a CPU, on that run queue's clock; 0 before we first saw it
    /// leave.
    pub offcpu_since_ns: u64,
    /// Its `se.sum_exec_runtime` (run time, ns) then: dates its next run's start where the
    /// kernel did not stamp it.
    pub sum_exec_ns: u64,
    /// The thread's `sched_info.run_delay` (total run-queue wait) when it last left a CPU, or
    /// 0 for a new thread: the next wait is what the kernel adds to it. Valid with
    /// `THREAD_HAS_BASE`.
    pub run_delay_base_ns: u64,
    /// The task's `start_time`: with the tid, identifies the thread (tids are reused). 0 in
    /// an entry the agent created for a thread that has not left a CPU since.
    pub start_ns: u64,
    pub tgid: u32,
    /// [`OffCpuReason`] of the last switch-out.
    pub reason: u8,
    /// `THREAD_*` bits.
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// The thread passed `sched_process_exit`: its last run is charged, later switches are not.
pub const THREAD_EXITING: u8 = 1;
/// `run_delay_base_ns` is set: the thread's next run-queue wait can be measured.
pub const THREAD_HAS_BASE: u8 = 4;
/// The thread is gone and its values are final, but they could not be moved to the dead-thread
/// map (full): the entry stays, untouched by the programs, until the agent folds it.
pub const THREAD_DEAD: u8 = 8;

const _: () = assert!(core::mem::size_of::<ThreadState>() == 40);

/// A thread's entry in `SW_THREADS` (keyed by tid) and, once it ended, in `SW_DEAD_THREADS`:
/// its state and what it has accumulated. A context switch costs one lookup; the agent sums
/// threads per process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadSched {
    pub state: ThreadState,
    pub stats: SchedStats,
}

const _: () = assert!(
    core::mem::size_of::<ThreadSched>()
        == core::mem::size_of::<ThreadState>() + core::mem::size_of::<SchedStats>()
);

impl ThreadSched {
    pub const ZERO: ThreadSched = ThreadSched {
        state: ThreadState {
            offcpu_since_ns: 0,
            sum_exec_ns: 0,
            run_delay_base_ns: 0,
            start_ns: 0,
            tgid: 0,
            reason: 0,
            flags: 0,
            _pad: [0; 2],
        },
        stats: SchedStats::ZERO,
    };
}

/// Key of an ended thread in `SW_DEAD_THREADS`: unique while the agent has not drained it,
/// even if the tid is reused meanwhile.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeadThreadKey {
    /// The thread's `start_time`.
    pub start_ns: u64,
    /// When its entry moved here (`bpf_ktime_get_ns`).
    pub ended_ns: u64,
    pub tid: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<DeadThreadKey>() == 24);

/// Scheduler aggregates of a thread (and, summed by the agent, of a process). Counters only
/// grow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedStats {
    /// Run-queue latency: from wakeup (or preemption while runnable) until the thread runs.
    pub runq: Hist,
    /// Off-CPU time from switch-out to switch-in, indexed by [`OffCpuReason`].
    pub offcpu: [Hist; NUM_OFFCPU_REASONS],
    /// Switch-outs counted as the kernel counts nvcsw / nivcsw.
    pub cswch_voluntary: u64,
    pub cswch_involuntary: u64,
}

const _: () = assert!(core::mem::size_of::<SchedStats>() == 4 * core::mem::size_of::<Hist>() + 16);

impl SchedStats {
    pub const ZERO: SchedStats = SchedStats {
        runq: Hist::ZERO,
        offcpu: [Hist::ZERO; NUM_OFFCPU_REASONS],
        cswch_voluntary: 0,
        cswch_involuntary: 0,
    };

    pub fn add(&mut self, other: &SchedStats) {
        self.runq.add(&other.runq);
        for (a, b) in self.offcpu.iter_mut().zip(other.offcpu.iter()) {
            a.add(b);
        }
        self.cswch_voluntary = self.cswch_voluntary.wrapping_add(other.cswch_voluntary);
        self.cswch_involuntary = self.cswch_involuntary.wrapping_add(other.cswch_involuntary);
    }

    /// `self - base`, or `None` if any counter went backwards.
    pub fn checked_sub(&self, base: &SchedStats) -> Option<SchedStats> {
        Some(SchedStats {
            runq: self.runq.checked_sub(&base.runq)?,
            offcpu: [
                self.offcpu[0].checked_sub(&base.offcpu[0])?,
                self.offcpu[1].checked_sub(&base.offcpu[1])?,
                self.offcpu[2].checked_sub(&base.offcpu[2])?,
            ],
            cswch_voluntary: self.cswch_voluntary.checked_sub(base.cswch_voluntary)?,
            cswch_involuntary: self.cswch_involuntary.checked_sub(base.cswch_involuntary)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_matches_the_kernels_nvcsw_rule() {
        use OffCpuReason::*;
        assert_eq!(OffCpuReason::classify(true, 0x1), Involuntary);
        assert_eq!(OffCpuReason::classify(false, TASK_RUNNING), Involuntary);
        assert_eq!(OffCpuReason::classify(false, 0x1), Voluntary); // TASK_INTERRUPTIBLE
        assert_eq!(OffCpuReason::classify(false, 0x2), Uninterruptible);
        assert_eq!(OffCpuReason::classify(false, 0x102), Uninterruptible); // TASK_KILLABLE
        assert_eq!(OffCpuReason::classify(false, 0x402), Voluntary); // TASK_IDLE
        assert_eq!(OffCpuReason::classify(false, 0x4), Voluntary); // __TASK_STOPPED
        assert_eq!(OffCpuReason::classify(false, 0x2002), Uninterruptible); // | TASK_FREEZABLE
        assert_eq!(OffCpuReason::classify(false, 0x2001), Voluntary); // | TASK_FREEZABLE
        assert_eq!(OffCpuReason::classify(false, 0x8000), Voluntary); // TASK_FROZEN
        assert_eq!(OffCpuReason::classify(false, 0x1000), Uninterruptible); // TASK_RTLOCK_WAIT
        assert_eq!(OffCpuReason::classify(true, 0x8000), Involuntary);
    }
}
