//! TCP probe ABI: per-socket state (socket-local storage) and per-process aggregates.

use crate::hist::Hist;

/// `SockState::kind`.
pub const SOCK_OUTBOUND: u8 = 1;
/// A listening socket; its state is cloned into every child the kernel creates from it.
pub const SOCK_LISTENER: u8 = 2;
pub const SOCK_INBOUND: u8 = 3;

/// `SockState::flags`: the peer sent a RST.
pub const SOCK_GOT_RST: u8 = 1;
/// An inbound connection the application has used (accepted).
pub const SOCK_ACCEPTED: u8 = 2;

/// Per-socket state in socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`, cloned from a
/// listener to its children, freed with the socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockState {
    /// Outbound: when the SYN was sent (connect). Inbound: when the handshake completed.
    pub start_ns: u64,
    /// When the last RTT sample was taken (RTT sampling is rate-limited per socket).
    pub last_rtt_ns: u64,
    /// Outbound: the process that connected. Listener and inbound: the one that listened.
    pub tgid: u32,
    pub kind: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<SockState>() == 24);

/// Outcome of an outbound connect, `TcpStats::outbound` index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outbound {
    Established = 0,
    /// The peer answered the SYN with a RST (closed port).
    Refused = 1,
    /// The kernel gave up retransmitting the SYN.
    Timeout = 2,
    /// Reset with another error than refusal.
    Reset = 3,
    /// An ICMP error (host/network unreachable) ended it.
    Unreachable = 4,
    /// The application closed the socket while it was still connecting.
    Abandoned = 5,
}

pub const NUM_OUTBOUND: usize = 6;

impl Outbound {
    pub const ALL: [Outbound; NUM_OUTBOUND] = [
        Outbound::Established,
        Outbound::Refused,
        Outbound::Timeout,
        Outbound::Reset,
        Outbound::Unreachable,
        Outbound::Abandoned,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Outbound::Established => "established",
            Outbound::Refused => "refused",
            Outbound::Timeout => "timeout",
            Outbound::Reset => "reset",
            Outbound::Unreachable => "unreachable",
            Outbound::Abandoned => "abandoned",
        }
    }

    /// Why a connecting socket closed, from what the kernel left in `sk_err` / `sk_err_soft`
    /// and whether a RST arrived.
    pub const fn classify(got_rst: bool, sk_err: i32, sk_err_soft: i32) -> Outbound {
        const ENETDOWN: i32 = 100;
        const ENETUNREACH: i32 = 101;
        const ECONNRESET: i32 = 104;
        const ETIMEDOUT: i32 = 110;
        const ECONNREFUSED: i32 = 111;
        const EHOSTDOWN: i32 = 112;
        const EHOSTUNREACH: i32 = 113;
        const fn unreachable(e: i32) -> bool {
            matches!(e, ENETDOWN | ENETUNREACH | EHOSTDOWN | EHOSTUNREACH)
        }
        match sk_err {
            ECONNREFUSED => Outbound::Refused,
            ECONNRESET => Outbound::Reset,
            e if unreachable(e) => Outbound::Unreachable,
            ETIMEDOUT if unreachable(sk_err_soft) => Outbound::Unreachable,
            ETIMEDOUT => Outbound::Timeout,
            _ if got_rst => Outbound::Refused,
            _ if unreachable(sk_err_soft) => Outbound::Unreachable,
            0 => Outbound::Abandoned,
            _ => Outbound::Reset,
        }
    }
}

/// Inbound connections, `TcpStats::inbound` index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// Handshake completed and the application took the connection (its first use).
    Accepted = 0,
    /// Handshake completed but the connection closed before the application used it.
    ClosedBeforeAccept = 1,
}

pub const NUM_INBOUND: usize = 2;

impl Inbound {
    pub const ALL: [Inbound; NUM_INBOUND] = [Inbound::Accepted, Inbound::ClosedBeforeAccept];

    pub const fn label(self) -> &'static str {
        match self {
            Inbound::Accepted => "accepted",
            Inbound::ClosedBeforeAccept => "closed_before_accept",
        }
    }
}

/// Per-process TCP aggregates (`SW_PROC_TCP`, per-CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpStats {
    pub connect: Hist,
    pub accept_wait: Hist,
    pub rtt: Hist,
    pub outbound: [u64; NUM_OUTBOUND],
    pub inbound: [u64; NUM_INBOUND],
    pub retransmits: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
}

const _: () = assert!(core::mem::size_of::<TcpStats>() == 3 * 232 + 11 * 8);

impl TcpStats {
    pub const ZERO: TcpStats = TcpStats {
        connect: Hist::ZERO,
        accept_wait: Hist::ZERO,
        rtt: Hist::ZERO,
        outbound: [0; NUM_OUTBOUND],
        inbound: [0; NUM_INBOUND],
        retransmits: 0,
        resets_sent: 0,
        resets_received: 0,
    };

    fn counters(&self) -> [u64; NUM_OUTBOUND + NUM_INBOUND + 3] {
        let mut c = [0; NUM_OUTBOUND + NUM_INBOUND + 3];
        let mut i = 0;
        while i < NUM_OUTBOUND {
            c[i] = self.outbound[i];
            i += 1;
        }
        c[NUM_OUTBOUND] = self.inbound[0];
        c[NUM_OUTBOUND + 1] = self.inbound[1];
        c[NUM_OUTBOUND + 2] = self.retransmits;
        c[NUM_OUTBOUND + 3] = self.resets_sent;
        c[NUM_OUTBOUND + 4] = self.resets_received;
        c
    }

    pub fn add(&mut self, o: &TcpStats) {
        self.connect.add(&o.connect);
        self.accept_wait.add(&o.accept_wait);
        self.rtt.add(&o.rtt);
        for i in 0..NUM_OUTBOUND {
            self.outbound[i] += o.outbound[i];
        }
        for i in 0..NUM_INBOUND {
            self.inbound[i] += o.inbound[i];
        }
        self.retransmits += o.retransmits;
        self.resets_sent += o.resets_sent;
        self.resets_received += o.resets_received;
    }

    /// `self - base`, or `None` if anything went backwards.
    pub fn checked_sub(&self, base: &TcpStats) -> Option<TcpStats> {
        let (a, b) = (self.counters(), base.counters());
        if a.iter().zip(b.iter()).any(|(x, y)| x < y) {
            return None;
        }
        let mut out = TcpStats {
            connect: self.connect.checked_sub(&base.connect)?,
            accept_wait: self.accept_wait.checked_sub(&base.accept_wait)?,
            rtt: self.rtt.checked_sub(&base.rtt)?,
            ..TcpStats::ZERO
        };
        for i in 0..NUM_OUTBOUND {
            out.outbound[i] = self.outbound[i] - base.outbound[i];
        }
        for i in 0..NUM_INBOUND {
            out.inbound[i] = self.inbound[i] - base.inbound[i];
        }
        out.retransmits = self.retransmits - base.retransmits;
        out.resets_sent = self.resets_sent - base.resets_sent;
        out.resets_received = self.resets_received - base.resets_received;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(Outbound::classify(true, 111, 0), Outbound::Refused);
        assert_eq!(Outbound::classify(false, 111, 0), Outbound::Refused);
        assert_eq!(Outbound::classify(false, 110, 0), Outbound::Timeout);
        assert_eq!(Outbound::classify(false, 110, 113), Outbound::Unreachable);
        assert_eq!(Outbound::classify(false, 113, 0), Outbound::Unreachable);
        assert_eq!(Outbound::classify(false, 104, 0), Outbound::Reset);
        assert_eq!(Outbound::classify(false, 0, 0), Outbound::Abandoned);
        assert_eq!(Outbound::classify(false, 0, 101), Outbound::Unreachable);
        assert_eq!(Outbound::classify(true, 0, 0), Outbound::Refused);
    }

    #[test]
    fn add_and_checked_sub_round_trip() {
        let mut a = TcpStats::ZERO;
        a.connect.observe(100_000);
        a.outbound[Outbound::Refused as usize] = 2;
        a.retransmits = 3;
        let mut b = a;
        b.add(&a);
        assert_eq!(b.checked_sub(&a), Some(a));
        assert_eq!(a.checked_sub(&b), None);
    }
}
