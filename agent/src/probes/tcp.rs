//! The `tcp` probe: connect latency and outcome, inbound connections and accept-queue wait,
//! sampled RTT, retransmits and resets, per process.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use aya::maps::PerCpuHashMap;
use prometheus::proto::MetricFamily;
use stallwatch_common::{names, tcp::TcpStats, Counter};

use super::process::{housekeeping, ProcessState, Source, TgidMap};
use super::{attach_tp_btf, KernelCounters, StartCtx};
use crate::metrics;

pub const NAME: &str = "tcp";

/// (program, tracepoint), attach order: socket state first, so later events find it. The
/// tcp_retransmit_skb program is chosen from the tracepoint's prototype.
const PROGRAMS: &[(&str, &str)] = &[
    (names::PROG_TCP_STATE, "inet_sock_set_state"),
    (names::PROG_TCP_RECV, "tcp_rcv_space_adjust"),
    (names::PROG_TCP_SYNACK, "tcp_retransmit_synack"),
    (names::PROG_TCP_SEND_RST, "tcp_send_reset"),
    (names::PROG_TCP_RECV_RST, "tcp_receive_reset"),
    (names::PROG_TCP_PROBE, "tcp_probe"),
];

/// `SW_PROC_TCP`: one per-CPU entry per process.
type TcpSource = TgidMap<TcpStats>;

type State = ProcessState<TcpSource>;

pub struct TcpProbe {
    state: Arc<Mutex<State>>,
    counters: Arc<KernelCounters>,
    max_processes: u32,
}

pub fn start(ctx: StartCtx<'_>) -> anyhow::Result<super::Started> {
    let map = ctx
        .ebpf
        .take_map(names::MAP_PROC_TCP)
        .with_context(|| format!("map {} missing from the eBPF object", names::MAP_PROC_TCP))?;
    let source = TcpSource::new(PerCpuHashMap::try_from(map)?);
    let state = Arc::new(Mutex::new(ProcessState::new(source, ctx.config)));
    ctx.lifecycle
        .subscribe(ctx.ebpf, ctx.kernel, state.clone())?;
    let mut programs = Vec::new();
    for (prog, tracepoint) in PROGRAMS {
        attach_tp_btf(ctx.ebpf, ctx.kernel, prog, tracepoint)?;
        programs.push(*prog);
    }
    // btf_trace_* prototypes start with the `void *` context argument.
    let retrans = match ctx
        .kernel
        .kbtf
        .func_proto_param_count("btf_trace_tcp_retransmit_skb")?
    {
        4 => names::PROG_TCP_RETRANS,
        _ => names::PROG_TCP_RETRANS_V1,
    };
    attach_tp_btf(ctx.ebpf, ctx.kernel, retrans, "tcp_retransmit_skb")?;
    programs.push(retrans);
    // tcp_sendmsg_locked is recent (6.8); without it, a connection the server writes to
    // before reading is taken as accepted at its first read or close instead.
    if ctx
        .kernel
        .kbtf
        .func_proto_param_count("btf_trace_tcp_sendmsg_locked")
        .is_ok()
    {
        attach_tp_btf(
            ctx.ebpf,
            ctx.kernel,
            names::PROG_TCP_SEND,
            "tcp_sendmsg_locked",
        )?;
        programs.push(names::PROG_TCP_SEND);
    } else {
        log::warn!(
            "no tcp_sendmsg_locked tracepoint on this kernel: accept-queue waits of servers \
             that write first end at their first read or close"
        );
    }
    programs.extend(ctx.lifecycle.programs.iter().copied());
    state.lock().expect("tcp state lock poisoned").prime();
    Ok(super::Started {
        probe: Box::new(TcpProbe {
            state: state.clone(),
            counters: ctx.counters,
            max_processes: ctx.config.max_processes,
        }),
        tasks: vec![Box::pin(housekeeping(state, NAME))],
        programs,
    })
}

impl TcpProbe {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("tcp state lock poisoned")
    }
}

impl super::Probe for TcpProbe {
    fn name(&self) -> &'static str {
        NAME
    }

    fn families(&self, arrived: Instant) -> Vec<MetricFamily> {
        let mut s = self.lock();
        s.refresh(arrived);
        metrics::tcp_families(&s.series())
    }

    fn drops(&self) -> Vec<(&'static str, u64)> {
        let s = self.lock();
        let k = |c| self.counters.get(c);
        let mut v = vec![
            ("socket_state_failed", k(Counter::SockStateFailed)),
            ("process_map_full", k(Counter::TcpProcMapFull)),
            ("process_alloc_failed", k(Counter::TcpProcAllocFailed)),
            ("untracked_socket", k(Counter::TcpUntracked)),
        ];
        v.extend(s.drops.list());
        v
    }

    fn maps(&self) -> Vec<super::MapFill> {
        let s = self.lock();
        vec![
            super::MapFill {
                map: names::MAP_SOCKS,
                entries: self
                    .counters
                    .get(Counter::SockInserted)
                    .saturating_sub(self.counters.get(Counter::SockDeleted)),
                capacity: None,
            },
            super::MapFill {
                map: names::MAP_PROC_TCP,
                entries: s.source.entries() as u64,
                capacity: Some(u64::from(self.max_processes)),
            },
        ]
    }

    fn tracked_processes(&self) -> usize {
        self.lock().agg.tracked_processes()
    }

    fn series_overflow(&self) -> Option<u64> {
        Some(self.lock().series_overflow())
    }
}
