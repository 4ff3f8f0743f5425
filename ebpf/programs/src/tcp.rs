//! TCP probe: connect latency and outcome, inbound connections and their accept-queue wait,
//! sampled smoothed RTT, retransmits and resets, per owning process.
//!
//! Per-socket state lives in socket-local storage: created when a process connects (in its
//! context) or listens, cloned by the kernel from a listener into every connection it
//! produces (so softirq-time events find their owner with no lookup table), and deleted
//! when the socket reaches TCP_CLOSE. Per-process aggregates are written from process and
//! softirq context alike, so every update is an atomic add.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_map, btf_tracepoint, map},
    maps::PerCpuHashMap,
    programs::BtfTracePointContext,
};
use stallwatch_common::{
    tcp::{
        Inbound, Outbound, SockState, TcpStats, SOCK_ACCEPTED, SOCK_GOT_RST, SOCK_INBOUND,
        SOCK_LISTENER, SOCK_OUTBOUND,
    },
    Counter,
};

use crate::local_storage::SkStorage;
use crate::shared::{atomic_add, btf_load, count, get_or_insert, observe_atomic, read_field};

const IPPROTO_TCP: u16 = 6;

// include/net/tcp_states.h
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSE_WAIT: i32 = 8;
const TCP_LAST_ACK: i32 = 9;
const TCP_LISTEN: i32 = 10;

#[no_mangle]
static SK_PROTOCOL_OFF: u32 = 0;
#[no_mangle]
static SK_ERR_OFF: u32 = 0;
#[no_mangle]
static SK_ERR_SOFT_OFF: u32 = 0;
#[no_mangle]
static TCP_SRTT_OFF: u32 = 0;
#[no_mangle]
static TCP_RTT_NS: u64 = 1_000_000_000;

#[btf_map]
static SW_SOCKS: SkStorage<SockState> = SkStorage::new();

/// Sized by the agent (`--max-processes`).
#[map]
static SW_PROC_TCP: PerCpuHashMap<u32, TcpStats> =
    PerCpuHashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

static ZERO_TCP: TcpStats = TcpStats::ZERO;

#[inline(always)]
fn stats(tgid: u32) -> Option<*mut TcpStats> {
    get_or_insert(
        &SW_PROC_TCP,
        &tgid,
        &ZERO_TCP,
        Counter::TcpProcMapFull,
        Counter::TcpProcAllocFailed,
    )
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn sw_tcp_state(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let sk: *const u8 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    // Direct loads through the tracepoint's BTF socket pointer: no helper call on the path
    // every socket state change of the node takes.
    if btf_load::<u16>(sk, &SK_PROTOCOL_OFF) != IPPROTO_TCP {
        return 0;
    }
    if new == TCP_SYN_SENT || new == TCP_LISTEN {
        // connect() / listen(): process context, current is the owner.
        let Some(s) = SW_SOCKS.get_or_create(sk) else {
            count(Counter::SockStateFailed);
            return 0;
        };
        unsafe {
            if (*s).kind == 0 {
                count(Counter::SockInserted);
            }
            *s = SockState {
                start_ns: bpf_ktime_get_ns(),
                last_rtt_ns: 0,
                tgid: current_tgid(),
                kind: if new == TCP_LISTEN {
                    SOCK_LISTENER
                } else {
                    SOCK_OUTBOUND
                },
                flags: 0,
                _pad: [0; 2],
            };
        }
        return 0;
    }
    let Some(s) = SW_SOCKS.get(sk) else {
        if old == TCP_SYN_SENT && (new == TCP_ESTABLISHED || new == TCP_CLOSE) {
            // A connect outcome with no one to give it to (a connect older than the agent,
            // or one whose state could not be created: counted there once per socket, here
            // as the event lost, like its retransmits).
            count(Counter::TcpUntracked);
        }
        return 0;
    };
    let s = unsafe { &mut *s };
    if old == TCP_LISTEN && new == TCP_SYN_RECV {
        // A child the kernel just cloned from a listener, storage included.
        if s.kind == SOCK_LISTENER {
            count(Counter::SockInserted);
            s.kind = SOCK_INBOUND;
            s.start_ns = 0;
            s.flags = 0;
        }
        return 0;
    }
    if old == TCP_SYN_SENT && new == TCP_ESTABLISHED && s.kind == SOCK_OUTBOUND {
        let now = unsafe { bpf_ktime_get_ns() };
        if let Some(st) = stats(s.tgid) {
            let st = unsafe { &mut *st };
            observe_atomic(&mut st.connect, now.saturating_sub(s.start_ns));
            atomic_add(&mut st.outbound[Outbound::Established as usize], 1);
        }
        return 0;
    }
    if old == TCP_SYN_RECV && new == TCP_ESTABLISHED && s.kind == SOCK_INBOUND {
        s.start_ns = unsafe { bpf_ktime_get_ns() };
        return 0;
    }
    if (old == TCP_ESTABLISHED && new == TCP_FIN_WAIT1)
        || (old == TCP_CLOSE_WAIT && new == TCP_LAST_ACK)
    {
        // The application closing the connection: its first use if it never read or wrote.
        first_use(s);
        return 0;
    }
    if new == TCP_CLOSE {
        if s.kind == SOCK_OUTBOUND && old == TCP_SYN_SENT {
            let err: i32 = btf_load(sk, &SK_ERR_OFF);
            let soft: i32 = btf_load(sk, &SK_ERR_SOFT_OFF);
            let result = Outbound::classify(s.flags & SOCK_GOT_RST != 0, err, soft);
            if let Some(st) = stats(s.tgid) {
                let st = unsafe { &mut *st };
                // Bounded index: the verifier sees the explicit match.
                let slot = match result {
                    Outbound::Established => &mut st.outbound[0],
                    Outbound::Refused => &mut st.outbound[1],
                    Outbound::Timeout => &mut st.outbound[2],
                    Outbound::Reset => &mut st.outbound[3],
                    Outbound::Unreachable => &mut st.outbound[4],
                    Outbound::Abandoned => &mut st.outbound[5],
                };
                atomic_add(slot, 1);
            }
        } else if s.kind == SOCK_INBOUND && s.start_ns != 0 && s.flags & SOCK_ACCEPTED == 0 {
            if let Some(st) = stats(s.tgid) {
                let st = unsafe { &mut *st };
                atomic_add(&mut st.inbound[Inbound::ClosedBeforeAccept as usize], 1);
            }
        }
        if SW_SOCKS.delete(sk) {
            count(Counter::SockDeleted);
        }
    }
    0
}

/// The application's first read, write or close of an inbound connection: it has taken it
/// from the accept queue. No tracepoint marks accept() itself. Attributed to the process
/// using it (current), which may differ from the listener's (e.g. socket activation).
#[inline(always)]
fn first_use(s: &mut SockState) {
    if s.kind != SOCK_INBOUND || s.start_ns == 0 || s.flags & SOCK_ACCEPTED != 0 {
        return;
    }
    s.flags |= SOCK_ACCEPTED;
    // From now on the connection belongs to the process using it.
    s.tgid = current_tgid();
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(st) = stats(s.tgid) {
        let st = unsafe { &mut *st };
        observe_atomic(&mut st.accept_wait, now.saturating_sub(s.start_ns));
        atomic_add(&mut st.inbound[Inbound::Accepted as usize], 1);
    }
}

#[inline(always)]
fn on_use(sk: *const u8) {
    if let Some(s) = SW_SOCKS.get(sk) {
        first_use(unsafe { &mut *s });
    }
}

#[btf_tracepoint(function = "tcp_rcv_space_adjust")]
pub fn sw_tcp_recv(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct sock *sk): tcp_recvmsg, process context.
    on_use(ctx.arg(0));
    0
}

#[btf_tracepoint(function = "tcp_sendmsg_locked")]
pub fn sw_tcp_send(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(const struct sock *sk, const struct msghdr *msg, const struct sk_buff *skb, int size_goal)
    on_use(ctx.arg(0));
    0
}

/// Adds one to a counter of the socket owner's process; untracked sockets are counted.
#[inline(always)]
fn owner_count(sk: *const u8, field: fn(&mut TcpStats) -> &mut u64) {
    let Some(s) = SW_SOCKS.get(sk) else {
        count(Counter::TcpUntracked);
        return;
    };
    let tgid = unsafe { (*s).tgid };
    if let Some(st) = stats(tgid) {
        atomic_add(field(unsafe { &mut *st }), 1);
    }
}

/// Errors (negated errnos) `__tcp_retransmit_skb` returns before it counts and transmits
/// the segment: EBUSY, EINVAL, EAGAIN, ENOMEM, EHOSTUNREACH.
const NOT_SENT: [i32; 5] = [-16, -22, -11, -12, -113];

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn sw_tcp_retrans(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(const struct sock *sk, const struct sk_buff *skb, int err): newer kernels
    // trace failed attempts too. Those that failed before the transmit (the original still
    // queued, nothing to send, no memory, no route) are not retransmits; one the device layer
    // refused (-ENOBUFS, a netfilter drop) is, and the kernel's RetransSegs counts it, so
    // this does too.
    let err: i64 = ctx.arg(2);
    let err = err as i32;
    if NOT_SENT.iter().any(|e| *e == err) {
        return 0;
    }
    owner_count(ctx.arg(0), |st| &mut st.retransmits);
    0
}

/// For kernels whose tracepoint has no `err` (before 6.14): every event went out.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn sw_tcp_retrans1(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(const struct sock *sk, const struct sk_buff *skb)
    owner_count(ctx.arg(0), |st| &mut st.retransmits);
    0
}

#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn sw_tcp_synack(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(const struct sock *sk, const struct request_sock *req): sk is the listener.
    owner_count(ctx.arg(0), |st| &mut st.retransmits);
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn sw_tcp_send_rst(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(const struct sock *sk, const struct sk_buff *skb, enum sk_rst_reason reason);
    // sk is NULL for a RST that answers a segment no socket owns (e.g. a closed port).
    let sk: *const u8 = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    owner_count(sk, |st| &mut st.resets_sent);
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn sw_tcp_recv_rst(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct sock *sk)
    let sk: *const u8 = ctx.arg(0);
    if let Some(s) = SW_SOCKS.get(sk) {
        unsafe { (*s).flags |= SOCK_GOT_RST };
    }
    owner_count(sk, |st| &mut st.resets_received);
    0
}

#[btf_tracepoint(function = "tcp_probe")]
pub fn sw_tcp_probe(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct sock *sk, const struct sk_buff *skb): every segment received on an
    // established connection. Samples srtt at most once per TCP_RTT_NS per socket.
    let sk: *const u8 = ctx.arg(0);
    let Some(s) = SW_SOCKS.get(sk) else {
        return 0;
    };
    let s = unsafe { &mut *s };
    let now = unsafe { bpf_ktime_get_ns() };
    let interval = unsafe { core::ptr::read_volatile(&TCP_RTT_NS) };
    if s.last_rtt_ns != 0 && now.saturating_sub(s.last_rtt_ns) < interval {
        return 0;
    }
    // tcp_sock.srtt_us holds the smoothed RTT in µs, shifted left by 3.
    let Some(srtt) = read_field::<u32>(sk, &TCP_SRTT_OFF) else {
        return 0;
    };
    if srtt == 0 {
        return 0;
    }
    s.last_rtt_ns = now;
    if let Some(st) = stats(s.tgid) {
        observe_atomic(unsafe { &mut (*st).rtt }, u64::from(srtt >> 3) * 1000);
    }
    0
}
