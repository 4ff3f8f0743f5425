//! Runtime-pause probe: stop-the-world pauses of Go and the JVM, CPython and V8 collections.
//!
//! The agent attaches these uprobes once per binary (every process that maps it fires them)
//! and creates an `SW_PROC_GC` entry for each process it recognised; a program finding no
//! entry counts the pause as untracked and stops. Pauses are rare (tens per second at most),
//! so the per-process entry is one shared value updated with atomic adds.

use aya_ebpf::{
    bindings::{pt_regs, BPF_F_NO_PREALLOC},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
};
use stallwatch_common::{
    gc::{
        Cause, GcStats, Inflight, GO_STW_GC_MARK_TERM, GO_STW_GC_SWEEP_TERM, JVM_REASON_GC,
        REASON_NONE,
    },
    Counter,
};

use crate::shared::{count, observe_atomic};

/// Sized by the agent (`--max-processes`); allocated per entry, as only runtime processes
/// have one.
#[map]
static SW_PROC_GC: HashMap<u32, GcStats> = HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// One entry per stopped process (or collecting thread); LRU so that a begin whose end never
/// comes (the process was killed mid-pause) cannot fill it.
#[map]
static SW_GC_INFLIGHT: LruHashMap<u64, Inflight> = LruHashMap::with_max_entries(4096, 0);

/// Go's register ABI (ABIInternal): integer arguments and results in RAX, RBX, RCX, RDI, ...
/// on x86_64 and R0, R1, R2, R3, ... on arm64.
#[inline(always)]
fn go_reg(regs: *mut pt_regs, i: usize) -> u64 {
    // SAFETY: `regs` is the program's context; the verifier allows direct reads of it.
    let r = unsafe { &*regs };
    #[cfg(bpf_target_arch = "x86_64")]
    {
        match i {
            0 => r.rax,
            1 => r.rbx,
            2 => r.rcx,
            _ => r.rdi,
        }
    }
    #[cfg(bpf_target_arch = "aarch64")]
    {
        r.regs[i & 3]
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The process's stats, or `None` (counted) if the agent does not track it.
#[inline(always)]
fn stats(tgid: u32) -> Option<*mut GcStats> {
    let p = SW_PROC_GC.get_ptr_mut(&tgid);
    if p.is_none() {
        count(Counter::GcUntracked);
    }
    p
}

#[inline(always)]
fn begin(key: u64, start_ns: u64, stopped_ns: u64, reason: u64) {
    let v = Inflight {
        start_ns,
        stopped_ns,
        reason,
        depth: 1,
        restart_ns: 0,
    };
    if SW_GC_INFLIGHT.insert(&key, &v, 0).is_err() {
        count(Counter::GcInflightFailed);
    }
}

/// Records the pause that began under `key` and ended at `end_ns`.
#[inline(always)]
fn end(tgid: u32, key: u64, end_ns: u64, cause_of: impl Fn(u64) -> Cause) {
    let Some(s) = stats(tgid) else { return };
    // SAFETY: map values stay valid for the program's run.
    let s = unsafe { &mut *s };
    let Some(f) = (unsafe { SW_GC_INFLIGHT.get(&key) }).copied() else {
        count(Counter::GcUnmatched);
        return;
    };
    let _ = SW_GC_INFLIGHT.remove(&key);
    let end_ns = if f.restart_ns != 0 {
        f.restart_ns
    } else {
        end_ns
    };
    if end_ns < f.start_ns {
        count(Counter::GcUnmatched);
        return;
    }
    let cause = cause_of(f.reason) as usize;
    if let Some(h) = s.pause.get_mut(cause) {
        observe_atomic(h, end_ns - f.start_ns);
    }
    if f.stopped_ns >= f.start_ns && f.stopped_ns != 0 && f.stopped_ns <= end_ns {
        observe_atomic(&mut s.stop, f.stopped_ns - f.start_ns);
    }
}

fn go_cause(reason: u64) -> Cause {
    match reason {
        REASON_NONE => Cause::Unknown,
        GO_STW_GC_MARK_TERM | GO_STW_GC_SWEEP_TERM => Cause::Gc,
        _ => Cause::Other,
    }
}

/// Go ≥1.22, entry of `startTheWorldWithSema(now int64, w worldStop) int64`: `w` arrives
/// flattened as reason (uint8), startedStopping, finishedStopping. The pause is measured from
/// startedStopping exactly as the runtime's own PauseNs is.
#[uprobe]
pub fn sw_go_start(ctx: ProbeContext) -> u32 {
    let tgid = tgid();
    if SW_PROC_GC.get_ptr(&tgid).is_none() {
        return 0;
    }
    let reason = go_reg(ctx.regs, 1) & 0xff;
    begin(
        u64::from(tgid),
        go_reg(ctx.regs, 2),
        go_reg(ctx.regs, 3),
        reason,
    );
    0
}

/// Go 1.21, entry of `stopTheWorldWithSema(reason stwReason)`: the runtime reads its clock
/// just before the call, so the pause starts here.
#[uprobe]
pub fn sw_go_stop(ctx: ProbeContext) -> u32 {
    let tgid = tgid();
    if SW_PROC_GC.get_ptr(&tgid).is_none() {
        return 0;
    }
    begin(u64::from(tgid), now(), 0, go_reg(ctx.regs, 0) & 0xff);
    0
}

/// Go 1.19–1.20, entry of `stopTheWorldWithSema()`, which takes no reason.
#[uprobe]
pub fn sw_go_stop0(_ctx: ProbeContext) -> u32 {
    let tgid = tgid();
    if SW_PROC_GC.get_ptr(&tgid).is_none() {
        return 0;
    }
    begin(u64::from(tgid), now(), 0, REASON_NONE);
    0
}

/// Go ≤1.21, entry of `gcCPULimiter.startGCTransition(enableGC bool, now int64)`, called
/// inside both GC stops with the runtime's own pause start (`now`, the clock read just before
/// it stopped the world): the pause starts there rather than at our later probe. It also
/// tells a GC stop from others on 1.19–1.20, which pass no reason.
#[uprobe]
pub fn sw_go_gcstart(ctx: ProbeContext) -> u32 {
    let key = u64::from(tgid());
    let Some(f) = SW_GC_INFLIGHT.get_ptr_mut(&key) else {
        return 0;
    };
    // SAFETY: map value, valid for this run; one stop-the-world at a time per process.
    let f = unsafe { &mut *f };
    let start = go_reg(ctx.regs, 2);
    if start != 0 && start <= f.start_ns {
        f.start_ns = start;
    }
    if f.reason == REASON_NONE {
        f.reason = if go_reg(ctx.regs, 1) & 0xff != 0 {
            GO_STW_GC_SWEEP_TERM
        } else {
            GO_STW_GC_MARK_TERM
        };
    }
    0
}

/// Go ≤1.21, entry of `gcCPULimiter.finishGCTransition(now int64)`: inside mark
/// termination's stop, `now` is where the runtime ends that pause's account (PauseNs).
/// After sweep termination it runs once the world has restarted, with no pause in flight.
#[uprobe]
pub fn sw_go_gcend(ctx: ProbeContext) -> u32 {
    let key = u64::from(tgid());
    if let Some(f) = SW_GC_INFLIGHT.get_ptr_mut(&key) {
        // SAFETY: as above.
        let f = unsafe { &mut *f };
        let end = go_reg(ctx.regs, 1);
        if end >= f.start_ns {
            f.restart_ns = end;
        }
    }
    0
}

/// Go, at each RET of `startTheWorldWithSema`: the result register holds the runtime's
/// nanotime() at which the world restarted. Never a uretprobe: Go moves stacks, and a
/// hijacked return address crashes it.
#[uprobe]
pub fn sw_go_ret(ctx: ProbeContext) -> u32 {
    let tgid = tgid();
    end(tgid, u64::from(tgid), go_reg(ctx.regs, 0), go_cause);
    0
}

fn jvm_cause(reason: u64) -> Cause {
    if reason == JVM_REASON_GC {
        Cause::Gc
    } else {
        Cause::Other
    }
}

/// JVM, entry of `SafepointSynchronize::begin()` (the VM thread starts stopping Java threads).
#[uprobe]
pub fn sw_jvm_begin(_ctx: ProbeContext) -> u32 {
    let tgid = tgid();
    if SW_PROC_GC.get_ptr(&tgid).is_none() {
        return 0;
    }
    begin(u64::from(tgid), now(), 0, 0);
    0
}

/// JVM, return of `SafepointSynchronize::begin()`: every Java thread is at the safepoint.
#[uretprobe]
pub fn sw_jvm_reached(_ctx: RetProbeContext) -> u32 {
    let key = u64::from(tgid());
    if let Some(f) = SW_GC_INFLIGHT.get_ptr_mut(&key) {
        // SAFETY: map value, valid for this run.
        unsafe { (*f).stopped_ns = now() };
    }
    0
}

/// JVM, USDT hotspot:gc__begin: a collection runs inside the current safepoint.
#[uprobe]
pub fn sw_jvm_gc(_ctx: ProbeContext) -> u32 {
    let key = u64::from(tgid());
    if let Some(f) = SW_GC_INFLIGHT.get_ptr_mut(&key) {
        // SAFETY: map value, valid for this run.
        unsafe { (*f).reason = JVM_REASON_GC };
    }
    0
}

/// JVM, return of `SafepointSynchronize::end()`: Java threads may run again.
#[uretprobe]
pub fn sw_jvm_end(_ctx: RetProbeContext) -> u32 {
    let tgid = tgid();
    end(tgid, u64::from(tgid), now(), jvm_cause);
    0
}

/// A per-thread collection that has not ended after this long never will.
const STALE_NS: u64 = 60_000_000_000;

fn gc_cause(_reason: u64) -> Cause {
    Cause::Gc
}

/// Per-thread collection begins (CPython gc__start, V8 `Heap::CollectGarbage` entry). Nested
/// calls on one thread count once, from the outermost.
#[uprobe]
pub fn sw_rt_begin(_ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if SW_PROC_GC.get_ptr(&((pid_tgid >> 32) as u32)).is_none() {
        return 0;
    }
    let t = now();
    if let Some(f) = SW_GC_INFLIGHT.get_ptr_mut(&pid_tgid) {
        // SAFETY: map value, valid for this run; only this thread uses its key.
        let f = unsafe { &mut *f };
        // A begin older than any collection is stale (its end was missed: the thread died
        // mid-collection and its id was reused): start afresh rather than nest under it.
        if t.saturating_sub(f.start_ns) < STALE_NS {
            f.depth += 1;
            return 0;
        }
    }
    begin(pid_tgid, t, 0, 0);
    0
}

#[inline(always)]
fn rt_end() {
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(f) = SW_GC_INFLIGHT.get_ptr_mut(&pid_tgid) {
        // SAFETY: as above.
        let f = unsafe { &mut *f };
        if f.depth > 1 {
            f.depth -= 1;
            return;
        }
    }
    end((pid_tgid >> 32) as u32, pid_tgid, now(), gc_cause);
}

/// Per-thread collection ends at a probe point (CPython gc__done).
#[uprobe]
pub fn sw_rt_end(_ctx: ProbeContext) -> u32 {
    rt_end();
    0
}

/// Per-thread collection ends at a function's return (V8 `Heap::CollectGarbage`).
#[uretprobe]
pub fn sw_rt_end_ret(_ctx: RetProbeContext) -> u32 {
    rt_end();
    0
}
