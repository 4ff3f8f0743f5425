//! Snapshots in, Prometheus metric families out. Names and help come from the catalogue.

pub mod catalogue;

use prometheus::proto::{self, MetricFamily, MetricType};
use stallwatch_common::{
    hist::{bucket_upper_bound_ns, Hist, NUM_BUCKETS},
    sched::{OffCpuReason, SchedStats},
};

use crate::aggregate::syscall::{Class, SyscallStats};
use crate::aggregate::SeriesKey;
use crate::probes::syscalls::Labeler;
use catalogue::{Kind, MetricDef};

const NS_PER_SEC: f64 = 1e9;

/// Builds one metric family; metrics are added with label values in the order of the
/// family's labels.
pub struct Family {
    def: &'static MetricDef,
    family: MetricFamily,
}

fn label_pairs(pairs: &[(&str, &str)]) -> Vec<proto::LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = proto::LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

impl Family {
    pub fn new(def: &'static MetricDef) -> Self {
        let mut family = MetricFamily::default();
        family.set_name(def.name.to_string());
        family.set_help(def.help.to_string());
        family.set_field_type(match def.kind {
            Kind::Counter => MetricType::COUNTER,
            Kind::Gauge => MetricType::GAUGE,
            Kind::Histogram => MetricType::HISTOGRAM,
        });
        Family { def, family }
    }

    pub fn value(&mut self, labels: &[(&str, &str)], v: f64) {
        let mut m = proto::Metric::from_label(label_pairs(labels));
        match self.def.kind {
            Kind::Counter => {
                let mut c = proto::Counter::default();
                c.set_value(v);
                m.set_counter(c);
            }
            Kind::Gauge => {
                let mut g = proto::Gauge::default();
                g.set_value(v);
                m.set_gauge(g);
            }
            Kind::Histogram => unreachable!("{} is a histogram", self.def.name),
        }
        self.family.mut_metric().push(m);
    }

    /// A log2 kernel histogram as a cumulative Prometheus histogram in seconds.
    pub fn histogram(&mut self, labels: &[(&str, &str)], h: &Hist) {
        let mut out = proto::Histogram::default();
        let mut buckets = Vec::with_capacity(NUM_BUCKETS - 1);
        let mut cumulative = 0u64;
        for (i, count) in h.buckets.iter().enumerate() {
            cumulative += count;
            if let Some(upper) = bucket_upper_bound_ns(i) {
                let mut b = proto::Bucket::default();
                b.set_upper_bound(upper as f64 / NS_PER_SEC);
                b.set_cumulative_count(cumulative);
                buckets.push(b);
            }
        }
        out.set_bucket(buckets);
        out.set_sample_count(cumulative);
        out.set_sample_sum(h.sum_ns as f64 / NS_PER_SEC);
        let mut m = proto::Metric::from_label(label_pairs(labels));
        m.set_histogram(out);
        self.family.mut_metric().push(m);
    }

    pub fn finish(self) -> Option<MetricFamily> {
        (!self.family.get_metric().is_empty()).then_some(self.family)
    }
}

/// The scheduler probe's per-process families.
pub fn sched_families(series: &[(SeriesKey, SchedStats)]) -> Vec<MetricFamily> {
    let pods = pod_index();
    let mut runq = Family::new(&catalogue::RUNQUEUE_LATENCY);
    let mut offcpu_total = Family::new(&catalogue::OFFCPU_SECONDS);
    let mut offcpu_hist = Family::new(&catalogue::OFFCPU_DURATION);
    let mut cswch = Family::new(&catalogue::CONTEXT_SWITCHES);
    for (key, s) in series {
        let owned = process_labels(key, &pods);
        let labels = borrowed(&owned);
        runq.histogram(&labels, &s.runq);
        for reason in OffCpuReason::ALL {
            let h = &s.offcpu[reason as usize];
            let mut l = labels.clone();
            l.push(("reason", reason.label()));
            offcpu_total.value(&l, h.sum_ns as f64 / NS_PER_SEC);
            offcpu_hist.histogram(&l, h);
        }
        for (kind, v) in [
            ("voluntary", s.cswch_voluntary),
            ("involuntary", s.cswch_involuntary),
        ] {
            let mut l = labels.clone();
            l.push(("kind", kind));
            cswch.value(&l, v as f64);
        }
    }
    [runq, offcpu_total, offcpu_hist, cswch]
        .into_iter()
        .filter_map(Family::finish)
        .collect()
}

fn pod_index() -> std::sync::RwLockReadGuard<'static, crate::attribution::kube::PodIndex> {
    // A writer that panicked left a consistent map (each update is one insert or remove).
    crate::attribution::kube::index()
        .read()
        .unwrap_or_else(|e| e.into_inner())
}

/// A process series' labels, in catalogue order (`PROCESS_LABELS`, then `pid`); labels with no
/// value are left out. Pod, namespace and container names come from the pod watch's index.
fn process_labels(
    key: &SeriesKey,
    pods: &crate::attribution::kube::PodIndex,
) -> Vec<(&'static str, String)> {
    let names = pods.lookup(&key.owner.pod_uid, &key.owner.container_id);
    let mut out = vec![("comm", key.comm.clone()), ("cgroup", key.cgroup.clone())];
    for (k, v) in [
        ("namespace", names.namespace),
        ("pod", names.pod),
        ("container", names.container),
        ("pod_uid", key.owner.pod_uid.as_str()),
        ("container_id", key.owner.container_id.as_str()),
        ("unit", key.owner.unit.as_str()),
    ] {
        if !v.is_empty() {
            out.push((k, v.to_string()));
        }
    }
    if let Some(pid) = key.pid {
        out.push(("pid", pid.to_string()));
    }
    out
}

fn borrowed<'a>(labels: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    labels.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The syscall probe's per-process families. Slots that label the same (several slots can
/// be `other`) are merged first, so no series appears twice.
pub fn syscall_families(
    series: &[(SeriesKey, SyscallStats)],
    labeler: &Labeler,
) -> Vec<MetricFamily> {
    use std::collections::BTreeMap;
    let mut latency = Family::new(&catalogue::SYSCALL_LATENCY);
    let mut errors = Family::new(&catalogue::SYSCALL_ERRORS);
    let pods = pod_index();
    for (key, s) in series {
        let base = process_labels(key, &pods);
        let mut hists: BTreeMap<(Class, Option<String>), Hist> = BTreeMap::new();
        for (slot, h) in &s.latency {
            hists
                .entry(labeler.labels(*slot))
                .or_insert(Hist::ZERO)
                .add(h);
        }
        let mut errs: BTreeMap<(Class, Option<String>, String), u64> = BTreeMap::new();
        for ((slot, errno), n) in &s.errors {
            let (class, name) = labeler.labels(*slot);
            *errs
                .entry((class, name, crate::aggregate::syscall::errno_name(*errno)))
                .or_insert(0) += n;
        }
        fn labels_for<'a>(
            base: &'a [(&'static str, String)],
            class: Class,
            name: &'a Option<String>,
        ) -> Vec<(&'a str, &'a str)> {
            let mut l = borrowed(base);
            l.push(("class", class.label()));
            if let Some(n) = name {
                l.push(("syscall", n));
            }
            l
        }
        for ((class, name), h) in &hists {
            latency.histogram(&labels_for(&base, *class, name), h);
        }
        for ((class, name, errno), n) in &errs {
            let mut l = labels_for(&base, *class, name);
            l.push(("errno", errno));
            errors.value(&l, *n as f64);
        }
    }
    [latency, errors]
        .into_iter()
        .filter_map(Family::finish)
        .collect()
}

/// The TCP probe's per-process families.
pub fn tcp_families(series: &[(SeriesKey, stallwatch_common::tcp::TcpStats)]) -> Vec<MetricFamily> {
    let pods = pod_index();
    use stallwatch_common::tcp::{Inbound, Outbound};
    let mut connect = Family::new(&catalogue::TCP_CONNECT_LATENCY);
    let mut conns = Family::new(&catalogue::TCP_CONNECTIONS);
    let mut accept = Family::new(&catalogue::TCP_ACCEPT_QUEUE);
    let mut rtt = Family::new(&catalogue::TCP_RTT);
    let mut retrans = Family::new(&catalogue::TCP_RETRANSMITS);
    let mut resets = Family::new(&catalogue::TCP_RESETS);
    for (key, s) in series {
        let owned = process_labels(key, &pods);
        let labels = borrowed(&owned);
        connect.histogram(&labels, &s.connect);
        accept.histogram(&labels, &s.accept_wait);
        rtt.histogram(&labels, &s.rtt);
        for r in Outbound::ALL {
            let mut l = labels.clone();
            l.extend([("direction", "outbound"), ("result", r.label())]);
            conns.value(&l, s.outbound[r as usize] as f64);
        }
        for r in Inbound::ALL {
            let mut l = labels.clone();
            l.extend([("direction", "inbound"), ("result", r.label())]);
            conns.value(&l, s.inbound[r as usize] as f64);
        }
        retrans.value(&labels, s.retransmits as f64);
        for (dir, v) in [("sent", s.resets_sent), ("received", s.resets_received)] {
            let mut l = labels.clone();
            l.push(("direction", dir));
            resets.value(&l, v as f64);
        }
    }
    [connect, conns, accept, rtt, retrans, resets]
        .into_iter()
        .filter_map(Family::finish)
        .collect()
}

/// The gc probe's families: per-process pauses, and discovery's gauges and failures.
pub fn gc_families(
    series: &[(SeriesKey, stallwatch_common::gc::GcStats)],
    processes: &[u64; stallwatch_common::gc::NUM_RUNTIMES],
    failures: &[((Option<stallwatch_common::gc::Runtime>, &'static str), u64)],
) -> Vec<MetricFamily> {
    use stallwatch_common::gc::{Cause, Runtime};
    let pods = pod_index();
    let mut pause = Family::new(&catalogue::RUNTIME_PAUSE);
    let mut stop = Family::new(&catalogue::RUNTIME_STOP_LATENCY);
    let mut procs = Family::new(&catalogue::RUNTIME_PROCESSES);
    let mut fails = Family::new(&catalogue::RUNTIME_ATTACH_FAILURES);
    for (key, s) in series {
        let Some(runtime) = Runtime::from_u32(s.runtime) else {
            continue;
        };
        let owned = process_labels(key, &pods);
        let mut labels = borrowed(&owned);
        labels.push(("runtime", runtime.label()));
        for c in Cause::ALL {
            let h = &s.pause[c as usize];
            // Causes a runtime never reports stay absent rather than exported as zeros.
            if h.count() > 0 || c == Cause::Gc {
                let mut l = labels.clone();
                l.push(("cause", c.label()));
                pause.histogram(&l, h);
            }
        }
        if s.stop.count() > 0 {
            stop.histogram(&labels, &s.stop);
        }
    }
    for r in Runtime::ALL {
        procs.value(&[("runtime", r.label())], processes[r as usize - 1] as f64);
    }
    let mut failures = failures.to_vec();
    failures.sort();
    for ((r, reason), n) in failures {
        let runtime = r.map_or("unknown", |r| r.label());
        fails.value(&[("runtime", runtime), ("reason", reason)], n as f64);
    }
    [pause, stop, procs, fails]
        .into_iter()
        .filter_map(Family::finish)
        .collect()
}

/// Size of the last exposition: the next one starts with room for it.
static LAST_EXPOSITION_LEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Prometheus text exposition of `families`, byte for byte what `prometheus::TextEncoder`
/// writes for every family this agent builds (named, typed counter, gauge or histogram, with
/// at least one metric; a test holds the two equal; the crate refuses an empty family and
/// panics on an untyped one, which are skipped here), but with each metric's labels escaped
/// once for all its lines, each bucket bound formatted once per scrape, integral values
/// written as integers and no allocation per sample: a 10k-series scrape spent most of its
/// time in the crate's per-line formatting.
pub fn encode(families: &[MetricFamily]) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let hint = LAST_EXPOSITION_LEN.load(Relaxed);
    let mut out = String::with_capacity(hint + hint / 8);
    // Bucket bounds as text, by position: every histogram of a scrape has the same ones.
    let mut bounds: Vec<(u64, String)> = Vec::new();
    let mut labels = String::new();
    for mf in families {
        let kind = mf.get_field_type();
        if mf.get_metric().is_empty() || mf.name().is_empty() || kind == MetricType::UNTYPED {
            continue;
        }
        let name = mf.name();
        if !mf.help().is_empty() {
            out.push_str("# HELP ");
            out.push_str(name);
            out.push(' ');
            push_escaped(&mut out, mf.help(), false);
            out.push('\n');
        }
        out.push_str("# TYPE ");
        out.push_str(name);
        out.push(' ');
        out.push_str(&format!("{kind:?}").to_lowercase());
        out.push('\n');
        for m in mf.get_metric() {
            // `{a="x",b="y"` (no closing brace), shared by the metric's lines.
            labels.clear();
            for (i, lp) in m.get_label().iter().enumerate() {
                labels.push(if i == 0 { '{' } else { ',' });
                labels.push_str(lp.name());
                labels.push_str("=\"");
                push_escaped(&mut labels, lp.value(), true);
                labels.push('"');
            }
            let ts = m.timestamp_ms();
            let line = |out: &mut String, postfix: &str, extra: Option<(&str, &str)>, v: f64| {
                out.push_str(name);
                out.push_str(postfix);
                if !labels.is_empty() || extra.is_some() {
                    out.push_str(&labels);
                    if let Some((k, val)) = extra {
                        out.push(if labels.is_empty() { '{' } else { ',' });
                        out.push_str(k);
                        out.push_str("=\"");
                        push_escaped(out, val, true);
                        out.push('"');
                    }
                    out.push('}');
                }
                out.push(' ');
                push_value(out, v);
                if ts != 0 {
                    out.push(' ');
                    out.push_str(&ts.to_string());
                }
                out.push('\n');
            };
            match kind {
                MetricType::COUNTER => line(&mut out, "", None, m.get_counter().get_value()),
                MetricType::GAUGE => line(&mut out, "", None, m.get_gauge().get_value()),
                MetricType::HISTOGRAM => {
                    let h = m.get_histogram();
                    let mut inf_seen = false;
                    for (i, b) in h.get_bucket().iter().enumerate() {
                        let upper = b.upper_bound();
                        if bounds.len() <= i {
                            bounds.push((upper.to_bits(), upper.to_string()));
                        } else if bounds[i].0 != upper.to_bits() {
                            bounds[i] = (upper.to_bits(), upper.to_string());
                        }
                        let le = bounds[i].1.as_str();
                        line(
                            &mut out,
                            "_bucket",
                            Some(("le", le)),
                            b.cumulative_count() as f64,
                        );
                        inf_seen |= upper.is_sign_positive() && upper.is_infinite();
                    }
                    if !inf_seen {
                        line(
                            &mut out,
                            "_bucket",
                            Some(("le", "+Inf")),
                            h.get_sample_count() as f64,
                        );
                    }
                    line(&mut out, "_sum", None, h.get_sample_sum());
                    line(&mut out, "_count", None, h.get_sample_count() as f64);
                }
                MetricType::SUMMARY => {
                    let s = m.get_summary();
                    for q in s.get_quantile() {
                        line(
                            &mut out,
                            "",
                            Some(("quantile", &q.quantile().to_string())),
                            q.value(),
                        );
                    }
                    line(&mut out, "_sum", None, s.sample_sum());
                    line(&mut out, "_count", None, s.sample_count() as f64);
                }
                MetricType::UNTYPED => {}
            }
        }
    }
    LAST_EXPOSITION_LEN.store(out.len(), Relaxed);
    out
}

/// Appends `v` escaped as the text format wants: `\\` and newline always, `"` in label
/// values.
fn push_escaped(out: &mut String, v: &str, quote: bool) {
    if !v
        .bytes()
        .any(|b| b == b'\\' || b == b'\n' || (quote && b == b'"'))
    {
        out.push_str(v);
        return;
    }
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// Appends `v` as `f64`'s `Display` writes it; integral values (counts, most of a scrape)
/// through the integer formatter.
fn push_value(out: &mut String, v: f64) {
    use std::fmt::Write;
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53: every integer below is exact
    if v.fract() == 0.0 && v.abs() < EXACT && !(v == 0.0 && v.is_sign_negative()) {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the prometheus crate's encoder writes for `families`.
    fn crate_encode(families: &[MetricFamily]) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(families, &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn encode_writes_what_the_prometheus_crate_writes() {
        let odd = "a\\b\"c\nd é";
        let mut counter = Family::new(&catalogue::CONTEXT_SWITCHES);
        for v in [0.0, -0.0, 3.0, 1e15, 9.1e15, 1e300, 0.5, -2.25, 1.0 / 3.0] {
            counter.value(&[("comm", odd), ("kind", "voluntary")], v);
        }
        counter.value(&[], 7.0);
        let mut gauge = Family::new(&catalogue::OFFCPU_SECONDS);
        for v in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN, 1e-7] {
            gauge.value(&[("reason", "x")], v);
        }
        let mut hist = Family::new(&catalogue::RUNQUEUE_LATENCY);
        let mut h = Hist::ZERO;
        for ns in [0, 1, 1500, 50_000_000, u64::MAX / 2] {
            h.observe(ns);
        }
        hist.histogram(&[("comm", odd)], &h);
        hist.histogram(&[], &Hist::ZERO);
        let mut families: Vec<MetricFamily> = [counter, gauge, hist]
            .into_iter()
            .filter_map(Family::finish)
            .collect();
        // A help text with the characters HELP escapes, and a metric with a timestamp.
        families[0].set_help("line one\nback\\slash \"quoted\"".into());
        families[1].mut_metric()[0].set_timestamp_ms(1_700_000_000_000);
        assert_eq!(encode(&families), crate_encode(&families));
    }

    #[test]
    fn sched_exposition_golden() {
        let mut s = SchedStats::ZERO;
        s.runq.observe(1500); // bucket le=2.048e-6
        s.offcpu[OffCpuReason::Voluntary as usize].observe(50_000_000);
        s.cswch_voluntary = 3;
        s.cswch_involuntary = 1;
        let key = SeriesKey {
            comm: "worker".into(),
            cgroup: "/system.slice/a.service".into(),
            owner: crate::aggregate::Owner {
                unit: "a.service".into(),
                ..Default::default()
            },
            pid: Some(7),
        };
        let text = encode(&sched_families(&[(key, s)]));
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/sched_exposition.txt"
        );
        if std::env::var_os("STALLWATCH_UPDATE_DOCS").is_some() {
            std::fs::write(path, &text).unwrap();
        }
        let want = std::fs::read_to_string(path).unwrap_or_default();
        assert!(text == want, "exposition changed; got:\n{text}");
        assert!(text.contains(
            "stallwatch_runqueue_latency_seconds_bucket{comm=\"worker\",cgroup=\"/system.slice/a.service\",unit=\"a.service\",pid=\"7\",le=\"0.000002048\"} 1"
        ));
        assert!(text.contains("stallwatch_offcpu_seconds_total{comm=\"worker\",cgroup=\"/system.slice/a.service\",unit=\"a.service\",pid=\"7\",reason=\"voluntary\"} 0.05"));
    }

    fn golden(name: &str, text: &str) {
        let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
        if std::env::var_os("STALLWATCH_UPDATE_DOCS").is_some() {
            std::fs::write(&path, text).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(text == want, "{name} changed; got:\n{text}");
    }

    #[test]
    fn tcp_exposition_golden() {
        use stallwatch_common::tcp::{Inbound, Outbound, TcpStats};
        let mut s = TcpStats::ZERO;
        s.connect.observe(150_000);
        s.accept_wait.observe(210_000_000);
        s.rtt.observe(60_000);
        s.outbound[Outbound::Established as usize] = 1;
        s.outbound[Outbound::Refused as usize] = 2;
        s.inbound[Inbound::Accepted as usize] = 1;
        s.retransmits = 3;
        s.resets_received = 2;
        let key = SeriesKey {
            comm: "client".into(),
            cgroup: "/".into(),
            owner: Default::default(),
            pid: Some(42),
        };
        let text = encode(&tcp_families(&[(key, s)]));
        golden("tcp_exposition.txt", &text);
        assert!(text.contains("stallwatch_tcp_connections_total{comm=\"client\",cgroup=\"/\",pid=\"42\",direction=\"outbound\",result=\"refused\"} 2"));
        assert!(text.contains("stallwatch_tcp_resets_total{comm=\"client\",cgroup=\"/\",pid=\"42\",direction=\"received\"} 2"));
        assert!(text.contains("stallwatch_tcp_accept_queue_seconds_bucket{comm=\"client\",cgroup=\"/\",pid=\"42\",le=\"0.268435456\"} 1"));
    }

    #[test]
    fn syscall_exposition_golden_by_class_and_by_name() {
        use crate::aggregate::syscall::{Class, Table};
        use stallwatch_common::syscall::SLOT_UNKNOWN;
        let key = SeriesKey {
            comm: "api".into(),
            cgroup: "/kubepods.slice/x".into(),
            owner: Default::default(),
            pid: None,
        };
        let obs = |ns: &[u64]| {
            let mut h = Hist::ZERO;
            for n in ns {
                h.observe(*n);
            }
            h
        };
        // By class: the unknown slot and class `other` share one series.
        let mut s = SyscallStats::default();
        s.latency
            .insert(Class::Sleep as u32, obs(&[10_000_000, 10_500_000]));
        s.latency.insert(Class::Other as u32, obs(&[900]));
        s.latency.insert(SLOT_UNKNOWN, obs(&[1_500]));
        s.errors.insert((Class::File as u32, 2), 1000);
        let text = encode(&syscall_families(
            &[(key.clone(), s)],
            &Labeler::new(Table::x86_64(), false),
        ));
        golden("syscall_exposition.txt", &text);
        assert!(text.contains("stallwatch_syscall_latency_seconds_count{comm=\"api\",cgroup=\"/kubepods.slice/x\",class=\"other\"} 2"));
        assert!(text.contains("stallwatch_syscall_errors_total{comm=\"api\",cgroup=\"/kubepods.slice/x\",class=\"file\",errno=\"ENOENT\"} 1000"));
        // By syscall number (x86_64: 35 nanosleep, 202 futex).
        let mut s = SyscallStats::default();
        s.latency.insert(35, obs(&[10_000_000]));
        s.latency.insert(202, obs(&[20_000_000]));
        s.errors.insert((202, 110), 1);
        let text = encode(&syscall_families(
            &[(key, s)],
            &Labeler::new(Table::x86_64(), true),
        ));
        golden("syscall_names_exposition.txt", &text);
        assert!(text.contains("stallwatch_syscall_latency_seconds_count{comm=\"api\",cgroup=\"/kubepods.slice/x\",class=\"sleep\",syscall=\"nanosleep\"} 1"));
        assert!(text.contains("stallwatch_syscall_errors_total{comm=\"api\",cgroup=\"/kubepods.slice/x\",class=\"lock\",syscall=\"futex\",errno=\"ETIMEDOUT\"} 1"));
    }
}
