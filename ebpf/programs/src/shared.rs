//! Maps and helpers every probe uses: drop counters, the process event stream, task reads.

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_probe_read_kernel},
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap, RingBuf},
};
use stallwatch_common::{Counter, ProcEvent, NUM_COUNTERS, TASK_COMM_LEN};

#[map]
static SW_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

/// Process lifecycle events; sized by the agent (`--event-buffer`).
#[map]
static SW_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Byte offset of `task_struct.tgid`, from kernel BTF; set by the agent before load.
#[no_mangle]
static TASK_TGID_OFF: u32 = 0;

/// Byte offset of `task_struct.pid`, from kernel BTF.
#[no_mangle]
static TASK_PID_OFF: u32 = 0;

/// Byte offset of `task_struct.__state` (or `state` before v5.14), from kernel BTF.
#[no_mangle]
static TASK_STATE_OFF: u32 = 0;

/// Byte offset of `task_struct.signal`, from kernel BTF.
#[no_mangle]
static TASK_SIGNAL_OFF: u32 = 0;

/// Byte offset of `signal_struct.live` (an `atomic_t`: its counter first), from kernel BTF.
#[no_mangle]
static SIGNAL_LIVE_OFF: u32 = 0;

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = SW_COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot, but programs in process context (sys_exit) can be preempted mid
        // update by another task on this CPU: atomic, and uncontended.
        atomic_add(slot, 1);
    }
}

/// Adds to a per-CPU counter that a preemptible program also updates.
#[inline(always)]
pub fn atomic_add(p: *mut u64, v: u64) {
    // core's AtomicU64 has no RMW methods on the BPF target; the intrinsic lowers to the BPF
    // atomic add instruction. SAFETY: `p` points into a map value, valid and 8-byte aligned.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, v,
        )
    };
}

/// Reads a kernel object's field at a byte offset the agent found in BTF (a global).
#[inline(always)]
pub fn read_field<T>(obj: *const u8, offset_global: &'static u32) -> Option<T> {
    let off = unsafe { core::ptr::read_volatile(offset_global) };
    let field = obj.wrapping_add(off as usize) as *const T;
    match unsafe { bpf_probe_read_kernel(field) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(Counter::TaskReadFailed);
            None
        }
    }
}

/// Loads a field of a kernel object through a BTF pointer (a tp_btf argument, or a pointer
/// loaded from one) at a byte offset the agent found in BTF. The offset global is frozen
/// `.rodata`, so the verifier sees a constant and checks the access against the type: one
/// load instruction, no helper call. A faulting read (a NULL pointer) yields zero.
#[inline(always)]
pub fn btf_load<T: Copy>(obj: *const u8, offset_global: &'static u32) -> T {
    unsafe {
        let off = core::ptr::read_volatile(offset_global);
        core::ptr::read_volatile(obj.wrapping_add(off as usize) as *const T)
    }
}

/// `task->tgid` of any task, through a BTF task pointer (a direct load).
#[inline(always)]
pub fn task_tgid(task: *const u8) -> u32 {
    btf_load(task, &TASK_TGID_OFF)
}

/// `task->pid` (the thread id) of any task, through a BTF task pointer.
#[inline(always)]
pub fn task_pid(task: *const u8) -> u32 {
    btf_load(task, &TASK_PID_OFF)
}

/// `task->__state`, for kernels whose sched_switch does not pass `prev_state`. Before v5.14
/// the field is a `long state`: its low 32 bits, which hold every state bit, on the
/// little-endian architectures we build for.
#[inline(always)]
pub fn task_state(task: *const u8) -> u32 {
    btf_load(task, &TASK_STATE_OFF)
}

/// `task->signal->live` (how many of the process's threads have not yet started to exit) and
/// the `signal_struct` address, which identifies the process while it exists.
#[inline(always)]
pub fn task_live_threads(task: *const u8) -> Option<(i32, u64)> {
    let signal: *const u8 = read_field(task, &TASK_SIGNAL_OFF)?;
    let live = read_field(signal, &SIGNAL_LIVE_OFF)?;
    Some((live, signal as u64))
}

/// Streams a lifecycle event of the current process; a full ring buffer is counted.
#[inline(always)]
pub fn emit_current(kind: u32, tgid: u32) {
    let Some(mut entry) = SW_EVENTS.reserve::<ProcEvent>(0) else {
        count(Counter::EventRingFull);
        return;
    };
    let comm = bpf_get_current_comm().unwrap_or([0u8; TASK_COMM_LEN]);
    entry.write(ProcEvent {
        kind,
        tgid,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm,
    });
    entry.submit(0);
}

pub const E2BIG: i32 = 7;

/// This CPU's value for `key`, inserted as a copy of `zero` if absent. A failed insert is
/// counted: `full` when the map is at capacity, `alloc_failed` otherwise. `zero` is a
/// static: per-process values are too large for the 512-byte BPF stack.
#[inline(always)]
pub fn get_or_insert<K, V>(
    map: &PerCpuHashMap<K, V>,
    key: &K,
    zero: &V,
    full: Counter,
    alloc_failed: Counter,
) -> Option<*mut V> {
    if let Some(p) = map.get_ptr_mut(key) {
        return Some(p);
    }
    if let Err(err) = map.insert(key, zero, u64::from(aya_ebpf::bindings::BPF_NOEXIST)) {
        // -EEXIST: another CPU inserted it first.
        if let Some(p) = map.get_ptr_mut(key) {
            return Some(p);
        }
        count(if err == -E2BIG { full } else { alloc_failed });
        return None;
    }
    map.get_ptr_mut(key)
}

/// Observes `ns` into a per-CPU histogram that preemptible or softirq-time programs also
/// update.
#[inline(always)]
pub fn observe_atomic(h: &mut stallwatch_common::hist::Hist, ns: u64) {
    let i = stallwatch_common::bucket_index(ns);
    if let Some(b) = h.buckets.get_mut(i) {
        atomic_add(b, 1);
    }
    atomic_add(&mut h.sum_ns, ns);
}
