//! Kernel tests of the tcp probe: traffic between two network namespaces joined by a veth
//! pair that each test creates (IPv4 and IPv6), the namespaces' own SNMP counters and `ss`
//! as ground truth. Every assertion is scoped to the workloads' pids.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const CONNS: &str = "stallwatch_tcp_connections_total";
const CONNECT: &str = "stallwatch_tcp_connect_latency_seconds";
const ACCEPT: &str = "stallwatch_tcp_accept_queue_seconds";
const RTT: &str = "stallwatch_tcp_rtt_seconds";
const RETRANS: &str = "stallwatch_tcp_retransmits_total";

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[derive(Clone, Copy, Debug)]
enum Family {
    V4,
    V6,
}

/// Client namespace `a` and server namespace `b`, joined by a veth pair; removed on drop.
struct Net {
    a: String,
    b: String,
    server_ip: String,
    family: Family,
}

impl Net {
    fn new(tag: &str, family: Family) -> Net {
        let id = format!("{}{}", tag, std::process::id() % 100_000);
        let (a, b) = (format!("swa-{id}"), format!("swb-{id}"));
        let (va, vb) = (format!("swa{id}"), format!("swb{id}"));
        for ns in [&a, &b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&[
            "ip", "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
        ]);
        let (ca, sb, server_ip) = match family {
            Family::V4 => ("10.231.0.1/24", "10.231.0.2/24", "10.231.0.2".to_string()),
            Family::V6 => (
                "fd00:5757::1/64",
                "fd00:5757::2/64",
                "fd00:5757::2".to_string(),
            ),
        };
        let v6 = matches!(family, Family::V6);
        for (ns, dev, addr) in [(&a, &va, ca), (&b, &vb, sb)] {
            let mut cmd = vec!["ip", "-n", ns, "addr", "add", addr, "dev", dev];
            if v6 {
                cmd.push("nodad");
            }
            sh(&cmd);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        Net {
            a,
            b,
            server_ip,
            family,
        }
    }

    fn addr(&self, port: u16) -> String {
        match self.family {
            Family::V4 => format!("{}:{port}", self.server_ip),
            Family::V6 => format!("[{}]:{port}", self.server_ip),
        }
    }

    /// The server namespace drops TCP SYNs to `port`.
    fn drop_syns_to(&self, port: u16) {
        let tool = match self.family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let port = port.to_string();
        sh(&[
            "ip", "netns", "exec", &self.b, tool, "-A", "INPUT", "-p", "tcp", "--syn", "--dport",
            &port, "-j", "DROP",
        ]);
    }

    /// The server namespace answers SYNs to `port` with ICMP host unreachable.
    fn reject_unreachable(&self, port: u16) {
        let (tool, with) = match self.family {
            Family::V4 => ("iptables", "icmp-host-unreachable"),
            Family::V6 => ("ip6tables", "icmp6-addr-unreachable"),
        };
        let port = port.to_string();
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.b,
            tool,
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--syn",
            "--dport",
            &port,
            "-j",
            "REJECT",
            "--reject-with",
            with,
        ]);
    }

    /// `Tcp: RetransSegs` of the client namespace (the TCP MIB covers IPv4 and IPv6).
    fn client_retrans_segs(&self) -> u64 {
        let snmp = sh(&["ip", "netns", "exec", &self.a, "cat", "/proc/net/snmp"]);
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
        let i = names
            .split_whitespace()
            .position(|n| n == "RetransSegs")
            .expect("RetransSegs column");
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn agent() -> Agent {
    Agent::start(&["--probes", "tcp", "--per-pid"])
}

/// For assertion messages: every nonzero connection count and every nonzero drop, so a
/// failure says where the event went (another result, another pid, or which drop).
fn context(m: &Metrics) -> String {
    format!(
        "connections: {:?}\ndrops: {:?}",
        m.nonzero(CONNS),
        m.nonzero("stallwatch_events_dropped_total")
    )
}

fn conns(m: &Metrics, pid: &str, direction: &str, result: &str) -> f64 {
    m.sum(
        CONNS,
        &[("pid", pid), ("direction", direction), ("result", result)],
    )
}

fn connects_are_counted_for_client_and_server(family: Family) {
    let net = Net::new("c", family);
    let agent = agent();
    let addr = net.addr(8080);
    let mut server = Workload::start_in(&net.b, &["tcp-serve", &addr, "20", "0"]);
    server.expect_line("listening", Duration::from_secs(10));
    let client = {
        let mut c = Workload::start_in(&net.a, &["tcp-connect", &addr, "20"]);
        c.expect_done(Duration::from_secs(30));
        c
    };
    server.expect_done(Duration::from_secs(30));
    let m = agent.scrape();
    let (c, s) = (client.pid_label(), server.pid_label());
    assert_eq!(
        conns(&m, &c, "outbound", "established"),
        20.0,
        "{family:?} client"
    );
    assert_eq!(
        m.sum(&format!("{CONNECT}_count"), &[("pid", &c)]),
        20.0,
        "{family:?} connect latency observations"
    );
    assert_eq!(
        conns(&m, &s, "inbound", "accepted"),
        20.0,
        "{family:?} server"
    );
    assert_eq!(
        m.sum(&format!("{ACCEPT}_count"), &[("pid", &s)]),
        20.0,
        "{family:?} accept-queue observations"
    );
    // Nothing failed and nothing was counted for the wrong side.
    for r in ["refused", "timeout", "reset", "unreachable", "abandoned"] {
        assert_eq!(conns(&m, &c, "outbound", r), 0.0, "{family:?} {r}");
    }
    assert_eq!(conns(&m, &s, "outbound", "established"), 0.0);
    assert_eq!(conns(&m, &c, "inbound", "accepted"), 0.0);
    client.finish();
    server.finish();
}

#[test]
fn connects_are_counted_for_client_and_server_v4() {
    let Some(_g) = kernel_or_skip("connects_are_counted_for_client_and_server_v4") else {
        return;
    };
    connects_are_counted_for_client_and_server(Family::V4);
}

#[test]
fn connects_are_counted_for_client_and_server_v6() {
    let Some(_g) = kernel_or_skip("connects_are_counted_for_client_and_server_v6") else {
        return;
    };
    connects_are_counted_for_client_and_server(Family::V6);
}

fn closed_port_is_refused(family: Family) {
    let net = Net::new("r", family);
    let agent = agent();
    let mut client = Workload::start_in(&net.a, &["tcp-try", &net.addr(9999), "0", "refused"]);
    client.expect_done(Duration::from_secs(10));
    let m = agent.scrape();
    let c = client.pid_label();
    assert_eq!(
        conns(&m, &c, "outbound", "refused"),
        1.0,
        "{family:?} client pid {c}\n{}",
        context(&m)
    );
    assert_eq!(conns(&m, &c, "outbound", "established"), 0.0);
    assert_eq!(
        m.sum(
            "stallwatch_tcp_resets_total",
            &[("pid", &c), ("direction", "received")]
        ),
        1.0,
        "{family:?} RST received"
    );
    client.finish();
}

#[test]
fn closed_port_is_refused_v4() {
    let Some(_g) = kernel_or_skip("closed_port_is_refused_v4") else {
        return;
    };
    closed_port_is_refused(Family::V4);
}

#[test]
fn closed_port_is_refused_v6() {
    let Some(_g) = kernel_or_skip("closed_port_is_refused_v6") else {
        return;
    };
    closed_port_is_refused(Family::V6);
}

fn dropped_syns_time_out(family: Family) {
    let net = Net::new("t", family);
    net.drop_syns_to(7777);
    let agent = agent();
    let before = net.client_retrans_segs();
    // TCP_SYNCNT=2: the kernel retransmits the SYN for a time budget set by the count (the
    // first retransmits are linear, net.ipv4.tcp_syn_linear_timeouts), then gives up.
    let mut client = Workload::start_in(&net.a, &["tcp-try", &net.addr(7777), "2", "timeout"]);
    client.expect_done(Duration::from_secs(30));
    let retrans_segs = net.client_retrans_segs() - before;
    let m = agent.scrape();
    let c = client.pid_label();
    assert_eq!(
        conns(&m, &c, "outbound", "timeout"),
        1.0,
        "{family:?} client pid {c}\n{}",
        context(&m)
    );
    assert!(
        retrans_segs >= 2,
        "{family:?}: RetransSegs grew by {retrans_segs}"
    );
    assert_eq!(
        m.sum(RETRANS, &[("pid", &c)]),
        retrans_segs as f64,
        "{family:?}: our retransmits vs TcpRetransSegs\n{}",
        context(&m)
    );
    client.finish();
}

#[test]
fn dropped_syns_time_out_and_retransmits_match_snmp_v4() {
    let Some(_g) = kernel_or_skip("dropped_syns_time_out_and_retransmits_match_snmp_v4") else {
        return;
    };
    dropped_syns_time_out(Family::V4);
}

#[test]
fn dropped_syns_time_out_and_retransmits_match_snmp_v6() {
    let Some(_g) = kernel_or_skip("dropped_syns_time_out_and_retransmits_match_snmp_v6") else {
        return;
    };
    dropped_syns_time_out(Family::V6);
}

#[test]
fn icmp_unreachable_is_classified_unreachable() {
    let Some(_g) = kernel_or_skip("icmp_unreachable_is_classified_unreachable") else {
        return;
    };
    for family in [Family::V4, Family::V6] {
        let net = Net::new("u", family);
        net.reject_unreachable(6666);
        let agent = agent();
        let mut client =
            Workload::start_in(&net.a, &["tcp-try", &net.addr(6666), "1", "unreachable"]);
        client.expect_done(Duration::from_secs(30));
        let m = agent.scrape();
        let c = client.pid_label();
        assert_eq!(
            conns(&m, &c, "outbound", "unreachable"),
            1.0,
            "{family:?} client pid {c}\n{}",
            context(&m)
        );
        assert_eq!(conns(&m, &c, "outbound", "timeout"), 0.0, "{family:?}");
        client.finish();
    }
}

#[test]
fn slow_accept_shows_in_the_accept_queue_histogram() {
    let Some(_g) = kernel_or_skip("slow_accept_shows_in_the_accept_queue_histogram") else {
        return;
    };
    let net = Net::new("q", Family::V4);
    let agent = agent();
    let addr = net.addr(8081);
    // The server leaves the queued connection there 200 ms before its first accept.
    let mut server = Workload::start_in(&net.b, &["tcp-serve", &addr, "1", "200"]);
    server.expect_line("listening", Duration::from_secs(10));
    let mut client = Workload::start_in(&net.a, &["tcp-connect", &addr, "1"]);
    client.expect_done(Duration::from_secs(10));
    server.expect_done(Duration::from_secs(10));
    let m = agent.scrape();
    let s = server.pid_label();
    assert_eq!(m.sum(&format!("{ACCEPT}_count"), &[("pid", &s)]), 1.0);
    // At least 200 ms: nothing in buckets up to 2^27 ns (134 ms)...
    let le = |shift: u32| format!("{}", (1u64 << shift) as f64 / 1e9);
    assert_eq!(
        m.sum(&format!("{ACCEPT}_bucket"), &[("pid", &s), ("le", &le(27))]),
        0.0
    );
    // ...and the sum says how much.
    let waited = m.sum(&format!("{ACCEPT}_sum"), &[("pid", &s)]);
    assert!(
        (0.2..1.0).contains(&waited),
        "accept-queue wait {waited} s for a 200 ms late accept"
    );
    // The client's connect did not wait for the accept: the kernel completed the handshake.
    let connect = m.sum(&format!("{CONNECT}_sum"), &[("pid", &client.pid_label())]);
    assert!(connect < 0.1, "connect took {connect} s");
    client.finish();
    server.finish();
}

/// `rtt:<ms>/<var>` of the connection to `addr` in namespace `ns`, in seconds.
fn ss_rtt(ns: &str, dst: &str) -> f64 {
    let out = sh(&["ip", "netns", "exec", ns, "ss", "-tin", "dst", dst]);
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("rtt:"))
        .and_then(|v| v.split('/').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no rtt in ss output:\n{out}"))
        / 1e3
}

#[test]
fn rtt_histogram_agrees_with_ss() {
    let Some(_g) = kernel_or_skip("rtt_histogram_agrees_with_ss") else {
        return;
    };
    let net = Net::new("p", Family::V4);
    let agent = Agent::start(&[
        "--probes",
        "tcp",
        "--per-pid",
        "--tcp-rtt-interval",
        "100ms",
    ]);
    let addr = net.addr(8082);
    let server = Workload::start_in(&net.b, &["tcp-serve", &addr, "1", "0"]);
    server.expect_line("listening", Duration::from_secs(10));
    // 60 echoes 20 ms apart: a long-lived connection with steady traffic.
    let mut client = Workload::start_in(&net.a, &["tcp-pingpong", &addr, "20", "60"]);
    client.expect_done(Duration::from_secs(30));
    let ss = ss_rtt(&net.a, &net.server_ip);
    let m = agent.scrape();
    let c = client.pid_label();
    let n = m.sum(&format!("{RTT}_count"), &[("pid", &c)]);
    assert!(
        n >= 5.0,
        "only {n} RTT samples over 1.2 s at a 100 ms interval"
    );
    let mean = m.sum(&format!("{RTT}_sum"), &[("pid", &c)]) / n;
    assert!(
        mean > ss / 2.0 && mean < ss * 2.0,
        "mean sampled RTT {mean} s vs ss rtt {ss} s"
    );
    client.finish();
    server.finish();
}

#[test]
fn ten_thousand_short_connections_leave_no_socket_state() {
    let Some(_g) = kernel_or_skip("ten_thousand_short_connections_leave_no_socket_state") else {
        return;
    };
    let net = Net::new("m", Family::V4);
    let agent = agent();
    let sockets = |m: &Metrics| m.sum("stallwatch_bpf_map_entries", &[("map", "SW_SOCKS")]);
    let addr = net.addr(8083);
    let mut server = Workload::start_in(&net.b, &["tcp-serve", &addr, "10000", "0"]);
    server.expect_line("listening", Duration::from_secs(10));
    // The listener holds one state while the server runs.
    let baseline = sockets(&agent.scrape());
    let mut client = Workload::start_in(&net.a, &["tcp-connect", &addr, "10000"]);
    client.expect_done(Duration::from_secs(120));
    server.expect_done(Duration::from_secs(30));
    let settled = wait_until(Duration::from_secs(10), || {
        sockets(&agent.scrape()) == baseline
    });
    let m = agent.scrape();
    assert!(
        settled,
        "socket states: {} after 10,000 connections, {baseline} before",
        sockets(&m)
    );
    assert_eq!(
        conns(&m, &client.pid_label(), "outbound", "established"),
        10_000.0
    );
    assert_eq!(
        conns(&m, &server.pid_label(), "inbound", "accepted"),
        10_000.0
    );
    assert_eq!(
        m.sum(
            "stallwatch_events_dropped_total",
            &[("probe", "tcp"), ("reason", "socket_state_failed")]
        ),
        0.0
    );
    client.finish();
    server.finish();
}
