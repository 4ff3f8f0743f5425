//! The Grafana dashboards (dashboards/*.json) and the rules (deploy/alerts, dashboards/rules),
//! proven against a real Prometheus scraping the real agent: workloads in kubelet-named
//! cgroups exercise every signal (run-queue contention, sleeps, D state, syscall errors, TCP
//! connects that succeed, are refused and time out, Go stop-the-world pauses), pods get their
//! names from the recorded PodList, Debian's Prometheus scrapes the agent every second and
//! evaluates the rules. Then every panel's every query, with its template variables set the
//! way Grafana would set them, must return data, and every rule must be healthy.
//!
//! STALLWATCH_DASHBOARDS_DIR=<dir> checks the dashboards (and <dir>/rules/*.yaml) there
//! instead; STALLWATCH_DASHBOARD_PREVIEW=<dir> renders each panel's range-query series to
//! <dir>/<dashboard uid>/<panel id>.png (`cargo xtask dashboards-preview` writes docs/dashboards).

mod common;
#[path = "common/preview.rs"]
mod preview;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use common::k8s::*;
use common::*;

const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Scrape and rule evaluation interval.
const SCRAPE_S: u64 = 1;
/// What `$__rate_interval` becomes: Grafana's is at least 4 scrape intervals; 15 s of 1 s
/// scrapes gives a steady rate.
const RATE_INTERVAL: &str = "15s";
/// How long Prometheus scrapes before the queries, so that every rate window is full.
const SCRAPING: Duration = Duration::from_secs(35);
/// The range queries' window (seconds back from now), at a step of one scrape interval.
const RANGE_S: u64 = 30;
const WAIT: Duration = Duration::from_secs(30);

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Percent-encoding for a query-string value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One GET (HTTP/1.0: the server closes, no chunking) that reports errors instead of panicking.
fn http(addr: SocketAddr, target: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {target} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Debian's Prometheus in a directory of its own; killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Scrapes the agent at `target` as job `stallwatch`, with `instance` set to the node's
    /// name as deploy/'s ServiceMonitor does, and evaluates `rule_files`.
    fn start(dir: &Path, target: SocketAddr, rule_files: &[PathBuf]) -> Prometheus {
        let q = |s: &str| serde_json::to_string(s).unwrap();
        let rules: String = rule_files
            .iter()
            .map(|f| format!("  - {}\n", q(&f.display().to_string())))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: {SCRAPE_S}s\n  scrape_timeout: {SCRAPE_S}s\n  evaluation_interval: {SCRAPE_S}s\n\
             rule_files:\n{rules}\
             scrape_configs:\n  - job_name: stallwatch\n    static_configs:\n      - targets: [{}]\n        labels:\n          instance: {NODE}\n",
            q(&target.to_string())
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {PROMETHEUS}: {e}"));
        let mut p = Prometheus {
            child,
            addr,
            dir: dir.to_path_buf(),
        };
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prometheus exited ({status}); its log:\n{}", p.log());
            }
            if matches!(http(addr, "/-/ready"), Ok((200, _))) {
                return p;
            }
            assert!(
                t0.elapsed() < WAIT,
                "prometheus not ready in {WAIT:?}; its log:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Panics with the log if Prometheus has exited.
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("prometheus exited ({status}); its log:\n{}", self.log());
        }
    }

    /// `data` of an API answer, or the error it gave.
    fn api(&self, target: &str) -> Result<Value, String> {
        let (code, body) = http(self.addr, target).map_err(|e| format!("GET {target}: {e}"))?;
        let v: Value =
            serde_json::from_str(&body).map_err(|_| format!("HTTP {code}: {body:.500}"))?;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!(
                "{}: {}",
                v["errorType"].as_str().unwrap_or("error"),
                v["error"].as_str().unwrap_or(&body)
            ))
        }
    }

    fn query(&self, expr: &str, at: f64) -> Result<Value, String> {
        self.api(&format!("/api/v1/query?query={}&time={at:.3}", enc(expr)))
    }

    fn query_range(&self, expr: &str, end: f64) -> Result<Value, String> {
        self.api(&format!(
            "/api/v1/query_range?query={}&start={:.3}&end={end:.3}&step={SCRAPE_S}",
            enc(expr),
            end - RANGE_S as f64
        ))
    }

    /// Values of `label` over the series `matcher` selects (all series if None), as Grafana's
    /// label_values() asks for them.
    fn label_values(
        &self,
        label: &str,
        matcher: Option<&str>,
        at: f64,
    ) -> Result<Vec<String>, String> {
        let mut target = format!(
            "/api/v1/label/{}/values?start={:.3}&end={at:.3}",
            enc(label),
            at - 600.0
        );
        if let Some(m) = matcher {
            target.push_str(&format!("&match[]={}", enc(m)));
        }
        let v = self.api(&target)?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A network namespace whose loopback drops SYNs to `port`: connects there time out after
/// SYN retransmits. Removed when dropped.
struct DroppingNetns(String);

impl DroppingNetns {
    fn new(port: u16) -> Option<DroppingNetns> {
        let name = format!("swdash-{}", std::process::id());
        let run = |args: &[&str]| {
            Command::new(args[0])
                .args(&args[1..])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let _ = run(&["ip", "netns", "del", &name]);
        let ns = DroppingNetns(name.clone());
        let port = port.to_string();
        let ok = run(&["ip", "netns", "add", &name])
            && run(&["ip", "-n", &name, "link", "set", "lo", "up"])
            && run(&[
                "ip", "netns", "exec", &name, "iptables", "-A", "INPUT", "-p", "tcp", "--syn",
                "--dport", &port, "-j", "DROP",
            ]);
        ok.then_some(ns)
    }
}

impl Drop for DroppingNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Everything the dashboards should show, running until dropped.
struct Workloads {
    procs: Vec<InCgroup>,
    _netns: Option<DroppingNetns>,
}

/// Starts the workloads: everything in shop/web-0's `app` container (so that one selection
/// of namespace, pod and container shows every signal), sleepers in payments/db-0,
/// batch/late-0 and a host service.
fn start_workloads(cgs: &mut Cgroups, go_bins: &[PathBuf]) -> Workloads {
    let root = cgroup2_root();
    let web = cgs.make(&root, &web_cgroup());
    let swload = env!("CARGO_BIN_EXE_swload");
    let mut procs = Vec::new();
    let exec = |dir: &Path, args: &[&str]| {
        let mut cmd = command_in(dir, swload);
        cmd.args(args);
        InCgroup::spawn(cmd)
    };
    // A loop in `dir`; the script gets `$1`=swload and the rest of `args`.
    let looping = |dir: &Path, script: &str, args: &[&str]| {
        let mut cmd = script_in(dir, script);
        cmd.arg(swload).args(args);
        InCgroup::spawn(cmd)
    };

    // Two spinners on one CPU: run-queue waits and involuntary switches, all the time.
    for _ in 0..2 {
        procs.push(exec(&web, &["spin", "1", "600000", "0"]));
    }
    // Sleeps (voluntary, sleep class), futex timeouts (lock class, ETIMEDOUT), opens of a
    // missing file (file class, ENOENT), vfork waits (D state).
    procs.push(exec(&web, &["sleep", "10000000", "20"]));
    procs.push(exec(&web, &["futex", "10000000", "50"]));
    procs.push(looping(
        &web,
        "while :; do \"$1\" openmissing 50 </dev/null >/dev/null; sleep 0.2; done",
        &[],
    ));
    procs.push(looping(
        &web,
        "while :; do \"$1\" vfork 50 </dev/null >/dev/null; sleep 0.1; done",
        &[],
    ));

    // TCP: a server and clients that connect to it (established, accepted, RTT), connects to
    // a closed port (refused, RST received), and to one whose SYNs are dropped (timeout,
    // SYN retransmits).
    let server = format!("127.0.0.1:{}", free_port());
    let s = exec(&web, &["tcp-serve", &server, "1000000000", "0"]);
    assert_eq!(
        s.next_line(Duration::from_secs(10)).as_deref(),
        Some("listening"),
        "tcp-serve {server}"
    );
    procs.push(s);
    procs.push(looping(
        &web,
        "while :; do \"$1\" tcp-connect \"$2\" 5 </dev/null >/dev/null; sleep 0.2; done",
        &[&server],
    ));
    let closed = format!("127.0.0.1:{}", free_port());
    procs.push(looping(
        &web,
        "while :; do \"$1\" tcp-try \"$2\" 0 </dev/null >/dev/null 2>&1; sleep 0.3; done",
        &[&closed],
    ));
    let netns = DroppingNetns::new(7777);
    match &netns {
        Some(ns) => procs.push(looping(
            &web,
            "while :; do ip netns exec \"$3\" \"$1\" tcp-try \"$2\" 1 </dev/null >/dev/null 2>&1; done",
            &["127.0.0.1:7777", &ns.0],
        )),
        None => eprintln!("no network namespace with iptables: no TCP timeouts or retransmits"),
    }

    // Go programs forcing a GC and a ReadMemStats stop five times a second.
    for bin in go_bins {
        let mut cmd = script_in(
            &web,
            "while :; do echo gc; echo mem; sleep 0.2; done | \"$1\" >/dev/null",
        );
        cmd.arg(bin);
        procs.push(InCgroup::spawn(cmd));
    }

    // A C program that claims to be Go (/bin/sleep with an empty .go.buildinfo, as in
    // kernel_gc.rs), started every 2 s: attach failures, reason unsupported_version.
    let fake = go_bins[0].with_file_name("fake-go");
    let empty = go_bins[0].with_file_name("empty");
    std::fs::write(&empty, b"").unwrap();
    let _ = std::fs::remove_file(&fake);
    let status = Command::new("objcopy")
        .arg(format!("--add-section=.go.buildinfo={}", empty.display()))
        .args(["/bin/sleep".as_ref(), fake.as_os_str()])
        .status()
        .expect("objcopy (binutils)");
    assert!(status.success(), "objcopy");
    let mut cmd = script_in(&web, "while :; do \"$1\" 2; done");
    cmd.arg(&fake);
    procs.push(InCgroup::spawn(cmd));

    // The other pods and a host service sleep, so the namespace and pod variables have more
    // than one value.
    for path in [
        db_cgroup(),
        late_cgroup(),
        "/system.slice/sw-dash-test.service".to_string(),
    ] {
        let dir = cgs.make(&root, &path);
        procs.push(exec(&dir, &["sleep", "10000000", "100"]));
    }
    Workloads {
        procs,
        _netns: netns,
    }
}

// ---------------------------------------------------------------------------------------
// Grafana template variables.

/// A template variable's value, rendered the way Grafana's Prometheus data source does.
#[derive(Clone, Debug)]
enum VarValue {
    /// One value; `regex`: the variable is multi-value or has "All", so the value is
    /// regex-escaped (it goes into `=~`).
    One { value: String, regex: bool },
    /// "All": the custom all value if set, else every value as `(a|b|...)`, regex-escaped.
    All {
        values: Vec<String>,
        custom: Option<String>,
    },
}

/// Grafana's prometheusSpecialRegexEscape.
fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\\\\\"),
            '$' | '^' | '*' | '{' | '}' | '[' | ']' | '\'' | '+' | '?' | '.' | '(' | ')' | '|' => {
                out.push_str("\\\\");
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

impl VarValue {
    fn render(&self, format: Option<&str>) -> String {
        match (self, format) {
            (VarValue::One { value, .. }, Some("regex")) => regex_escape(value),
            (VarValue::One { value, regex: true }, None) => regex_escape(value),
            (VarValue::One { value, .. }, _) => value.clone(),
            (
                VarValue::All {
                    custom: Some(c), ..
                },
                _,
            ) => c.clone(),
            (VarValue::All { values, .. }, Some("pipe")) => values.join("|"),
            (VarValue::All { values, .. }, Some("csv" | "text" | "raw")) => values.join(","),
            (VarValue::All { values, .. }, _) => format!(
                "({})",
                values
                    .iter()
                    .map(|v| regex_escape(v))
                    .collect::<Vec<_>>()
                    .join("|")
            ),
        }
    }
}

/// The built-in variables, for a dashboard range of the last minute and 1 s scrapes.
fn builtin(name: &str) -> Option<String> {
    Some(
        match name {
            "__rate_interval" => RATE_INTERVAL,
            "__interval" => "1s",
            "__interval_ms" => "1000",
            "__range" => "1m",
            "__range_s" => "60",
            "__range_ms" => "60000",
            _ => return None,
        }
        .to_string(),
    )
}

/// `text` with `$var`, `${var}`, `${var:format}` and `[[var]]` replaced; unknown names are
/// left as they are (as Grafana does). Also returns the names of the variables used.
fn substitute(text: &str, vars: &BTreeMap<String, VarValue>) -> (String, BTreeSet<String>) {
    let mut out = String::new();
    let mut used = BTreeSet::new();
    let lookup = |name: &str, format: Option<&str>| -> Option<String> {
        builtin(name).or_else(|| vars.get(name).map(|v| v.render(format)))
    };
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let mut replaced = None;
        // `${name[:format]}` and `[[name[:format]]]`: the same but for their brackets.
        let bracketed = [("${", "}"), ("[[", "]]")]
            .into_iter()
            .find_map(|(open, close)| {
                let inner = rest.strip_prefix(open)?;
                let end = inner.find(close)?;
                Some((&inner[..end], open.len() + end + close.len()))
            });
        if let Some((spec, len)) = bracketed {
            let (name, format) = match spec.split_once(':') {
                Some((n, f)) => (n, Some(f)),
                None => (spec, None),
            };
            replaced = lookup(name, format).map(|v| (v, name.to_string(), len));
        } else if let Some(inner) = rest.strip_prefix('$') {
            let name: String = inner
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                replaced = lookup(&name, None).map(|v| (v, name.clone(), name.len() + 1));
            }
        }
        match replaced {
            Some((value, name, len)) => {
                out.push_str(&value);
                used.insert(name);
                i += len;
            }
            None => {
                let c = rest.chars().next().unwrap();
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    (out, used)
}

/// The value a test run prefers for a label: the workload pod's, the agent's node.
fn preferred(label: &str) -> &'static [&'static str] {
    match label {
        "namespace" => &["shop"],
        "pod" => &["web-0"],
        "container" => &["app"],
        "instance" | "node" => &[NODE],
        "job" => &["stallwatch"],
        "comm" => &["swload"],
        "runtime" => &["go"],
        _ => &[],
    }
}

/// A dashboard's template variables resolved against Prometheus, in dashboard order.
struct Variables {
    /// The selection the checks start from.
    values: BTreeMap<String, VarValue>,
    /// Other values single-value variables can take, tried when a query has no data.
    alternatives: BTreeMap<String, Vec<String>>,
    /// Variables whose query failed or returned nothing.
    errors: Vec<String>,
    /// Notes on what was chosen, for the log.
    notes: Vec<String>,
}

/// `label_values(selector, label)` / `label_values(label)`: (label, selector).
fn parse_label_values(q: &str) -> Option<(String, Option<String>)> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    // The last comma outside braces and quotes separates the selector from the label.
    let (mut depth, mut quote, mut split) = (0, None, None);
    for (i, c) in inner.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(c),
            (None, '{' | '(' | '[') => depth += 1,
            (None, '}' | ')' | ']') => depth -= 1,
            (None, ',') if depth == 0 => split = Some(i),
            _ => {}
        }
    }
    Some(match split {
        Some(i) => (
            inner[i + 1..].trim().to_string(),
            Some(inner[..i].trim().to_string()),
        ),
        None => (inner.trim().to_string(), None),
    })
}

fn current_value(v: &Value) -> Option<String> {
    let c = &v["current"]["value"];
    c.as_str()
        .map(String::from)
        .or_else(|| c.as_array()?.first()?.as_str().map(String::from))
}

/// Resolves the variables in dashboard order (a variable's query may use earlier ones).
/// `pick_one`: every variable gets one value, the test workload's where it has one (the
/// view of one pod); otherwise variables with "All" take it (the dashboard's default view).
fn resolve_variables(prom: &Prometheus, dashboard: &Value, at: f64, pick_one: bool) -> Variables {
    let mut vars = Variables {
        values: BTreeMap::new(),
        alternatives: BTreeMap::new(),
        errors: Vec::new(),
        notes: Vec::new(),
    };
    let list = dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for v in &list {
        let Some(name) = v["name"].as_str() else {
            continue;
        };
        let kind = v["type"].as_str().unwrap_or("");
        let include_all = v["includeAll"].as_bool().unwrap_or(false);
        let multi = v["multi"].as_bool().unwrap_or(false);
        let custom_all = v["allValue"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(String::from);
        let query = match &v["query"] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o
                .get("query")
                .and_then(|q| q.as_str())
                .unwrap_or("")
                .to_string(),
            _ => String::new(),
        };
        // (candidate values, the label they are values of)
        let (candidates, label): (Vec<String>, String) = match kind {
            "datasource" | "adhoc" => continue,
            "constant" | "textbox" | "interval" => {
                let value = if kind == "interval" {
                    current_value(v)
                        .filter(|c| !c.starts_with('$') && c != "auto")
                        .unwrap_or(RATE_INTERVAL.to_string())
                } else {
                    current_value(v).unwrap_or(query.clone())
                };
                vars.values.insert(
                    name.into(),
                    VarValue::One {
                        value,
                        regex: false,
                    },
                );
                continue;
            }
            "custom" => (
                query
                    .split(',')
                    .map(|o| o.rsplit(" : ").next().unwrap().trim().to_string())
                    .filter(|o| !o.is_empty())
                    .collect(),
                name.to_string(),
            ),
            "query" => {
                let (q, _) = substitute(&query, &vars.values);
                match parse_label_values(&q) {
                    Some((label, selector)) => {
                        match prom.label_values(&label, selector.as_deref(), at) {
                            Ok(values) => (values, label),
                            Err(e) => {
                                vars.errors.push(format!("${name}: {q}: {e}"));
                                (Vec::new(), label)
                            }
                        }
                    }
                    None => {
                        vars.notes.push(format!(
                            "${name}: {q:?} is not label_values(); its current value is used"
                        ));
                        (current_value(v).into_iter().collect(), name.to_string())
                    }
                }
            }
            other => {
                vars.notes.push(format!(
                    "${name}: type {other:?} not understood; its current value is used"
                ));
                (current_value(v).into_iter().collect(), name.to_string())
            }
        };
        if v["regex"].as_str().is_some_and(|r| !r.is_empty()) {
            vars.notes.push(format!(
                "${name}: its regex {:?} is not applied",
                v["regex"]
            ));
        }
        if candidates.is_empty() {
            vars.errors
                .push(format!("${name}: no values (query {query:?})"));
        }
        let value = if include_all && !pick_one {
            VarValue::All {
                values: candidates.clone(),
                custom: custom_all,
            }
        } else {
            let pick = preferred(&label)
                .iter()
                .chain(preferred(name))
                .map(|p| p.to_string())
                .find(|p| candidates.contains(p))
                .or_else(|| current_value(v).filter(|c| candidates.contains(c)))
                .or_else(|| candidates.first().cloned())
                .unwrap_or_default();
            vars.alternatives.insert(
                name.into(),
                candidates.iter().filter(|c| **c != pick).cloned().collect(),
            );
            VarValue::One {
                value: pick,
                regex: multi || include_all,
            }
        };
        vars.notes
            .push(format!("${name} = {}", value.render(Some("raw"))));
        vars.values.insert(name.into(), value);
    }
    vars
}

// ---------------------------------------------------------------------------------------
// PromQL checks.

/// Label names an expression refers to (in by/without/on/ignoring/group_* lists and in
/// matchers), and those it creates itself (label_replace/label_join targets).
fn referenced_labels(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let c: Vec<char> = expr.chars().collect();
    let (mut used, mut created) = (BTreeSet::new(), BTreeSet::new());
    let skip_ws = |mut i: usize| {
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        i
    };
    // A string literal starting at i: (its text, the index after it).
    let string_at = |i: usize| -> (String, usize) {
        let q = c[i];
        let mut j = i + 1;
        let mut s = String::new();
        while j < c.len() && c[j] != q {
            if c[j] == '\\' && q != '`' {
                j += 1;
            }
            if j < c.len() {
                s.push(c[j]);
            }
            j += 1;
        }
        (s, j + 1)
    };
    let is_ident = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i = string_at(i).1;
        } else if ch.is_ascii_digit() {
            while i < c.len() && (is_ident(c[i]) || c[i] == '.') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && is_ident(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let j = skip_ws(i);
            if j < c.len() && c[j] == '(' {
                if matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    let end = (j..c.len()).find(|&k| c[k] == ')').unwrap_or(c.len());
                    let list: String = c[j + 1..end].iter().collect();
                    used.extend(
                        list.split(',')
                            .map(|l| l.trim().to_string())
                            .filter(|l| !l.is_empty()),
                    );
                    i = end + 1;
                } else if word == "label_replace" || word == "label_join" {
                    // The target label is the string after the first top-level comma.
                    let mut depth = 0;
                    let mut k = j;
                    while k < c.len() {
                        match c[k] {
                            '"' | '\'' | '`' => {
                                k = string_at(k).1;
                                continue;
                            }
                            '(' | '{' | '[' => depth += 1,
                            ')' | '}' | ']' => depth -= 1,
                            ',' if depth == 1 => {
                                let s = skip_ws(k + 1);
                                if s < c.len() && matches!(c[s], '"' | '\'' | '`') {
                                    created.insert(string_at(s).0);
                                }
                                break;
                            }
                            _ => {}
                        }
                        k += 1;
                    }
                }
            }
        } else if ch == '{' {
            // Matchers: name op "value", ...
            i += 1;
            loop {
                i = skip_ws(i);
                if i >= c.len() || c[i] == '}' {
                    i += 1;
                    break;
                }
                let start = i;
                while i < c.len() && is_ident(c[i]) {
                    i += 1;
                }
                if i > start {
                    used.insert(c[start..i].iter().collect());
                }
                i = skip_ws(i);
                while i < c.len() && matches!(c[i], '=' | '!' | '~') {
                    i += 1;
                }
                i = skip_ws(i);
                if i < c.len() && matches!(c[i], '"' | '\'' | '`') {
                    i = string_at(i).1;
                } else if i == start {
                    i += 1; // not a matcher list after all
                }
                i = skip_ws(i);
                if i < c.len() && c[i] == ',' {
                    i += 1;
                }
            }
        } else {
            i += 1;
        }
    }
    (used, created)
}

/// One series of a query result: its labels and (t, v) points.
type Series = (BTreeMap<String, String>, Vec<(f64, f64)>);

/// A query result's series. Instant vectors give one point.
fn series(data: &Value) -> Vec<Series> {
    let point = |p: &Value| {
        (
            p[0].as_f64().unwrap_or(0.0),
            p[1].as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN),
        )
    };
    match data["resultType"].as_str() {
        Some("scalar" | "string") => vec![(BTreeMap::new(), vec![point(&data["result"])])],
        _ => data["result"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        let labels = s["metric"]
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let points = match s["values"].as_array() {
                            Some(vs) => vs.iter().map(point).collect(),
                            None => vec![point(&s["value"])],
                        };
                        (labels, points)
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// `{{label}}` names in a legend format.
fn legend_labels(format: &str) -> Vec<String> {
    format
        .split("{{")
        .skip(1)
        .filter_map(|p| Some(p.split_once("}}")?.0.trim().to_string()))
        .collect()
}

fn legend(format: &str, labels: &BTreeMap<String, String>) -> String {
    if format.is_empty() || format == "__auto" {
        let inner: Vec<String> = labels
            .iter()
            .filter(|(k, _)| *k != "__name__")
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        return format!(
            "{}{{{}}}",
            labels.get("__name__").map(String::as_str).unwrap_or(""),
            inner.join(", ")
        );
    }
    let mut out = String::new();
    let mut rest = format;
    while let Some((before, after)) = rest.split_once("{{") {
        out.push_str(before);
        match after.split_once("}}") {
            Some((name, tail)) => {
                out.push_str(labels.get(name.trim()).map(String::as_str).unwrap_or(""));
                rest = tail;
            }
            None => {
                rest = after;
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Every panel with its nested panels (collapsed rows; the old `rows` layout too).
fn all_panels(dashboard: &Value) -> Vec<Value> {
    fn walk(panels: &Value, out: &mut Vec<Value>) {
        for p in panels.as_array().into_iter().flatten() {
            out.push(p.clone());
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    for row in dashboard["rows"].as_array().into_iter().flatten() {
        walk(&row["panels"], &mut out);
    }
    out
}

struct Failure {
    place: String,
    expr: String,
    error: String,
}

/// One target's query as the dashboard shows it by default, and its range series.
struct Checked {
    expr: String,
    range: Option<Value>,
}

/// The first substitution of `raw` that has data: with the variables' values, then with one
/// single-value variable changed at a time. Err: the query's error. Ok(None): no data.
fn first_with_data(
    prom: &Prometheus,
    raw: &str,
    vars: &Variables,
    at: f64,
) -> Result<Option<(String, Value)>, (String, String)> {
    let (_, used) = substitute(raw, &vars.values);
    let mut selections = vec![vars.values.clone()];
    for name in &used {
        for alt in vars.alternatives.get(name).into_iter().flatten().take(20) {
            let mut s = vars.values.clone();
            if let Some(VarValue::One { value, .. }) = s.get_mut(name) {
                *value = alt.clone();
            }
            selections.push(s);
        }
    }
    for s in &selections {
        let (expr, _) = substitute(raw, s);
        match prom.query(&expr, at) {
            Err(e) => return Err((expr, e)),
            Ok(data) if !series(&data).is_empty() => return Ok(Some((expr, data))),
            Ok(_) => {}
        }
    }
    Ok(None)
}

/// Checks one target: it must have data in the dashboard's default view (instant, and range
/// unless the target is instant-only) and with the test workload's pod selected, and every
/// label it or its legend names must exist.
#[allow(clippy::too_many_arguments)]
fn check_target(
    prom: &Prometheus,
    views: &[Variables; 2],
    target: &Value,
    at: f64,
    known_labels: &BTreeSet<String>,
    place: &str,
    failures: &mut Vec<Failure>,
    notes: &mut Vec<String>,
) -> Option<Checked> {
    let raw = target["expr"].as_str().filter(|e| !e.trim().is_empty())?;
    let fail = |failures: &mut Vec<Failure>, expr: &str, error: String| {
        failures.push(Failure {
            place: place.to_string(),
            expr: expr.to_string(),
            error,
        })
    };
    let mut shown = None;
    for (i, vars) in views.iter().enumerate() {
        let view = ["default view", "test pod selected"][i];
        let default = substitute(raw, &vars.values).0;
        if i == 1 && default == substitute(raw, &views[0].values).0 {
            break; // no variable that the selection changes
        }
        match first_with_data(prom, raw, vars, at) {
            Err((expr, e)) => {
                fail(failures, &expr, e);
                return None;
            }
            Ok(None) => fail(
                failures,
                &default,
                format!("no data ({view}, instant query)"),
            ),
            Ok(Some((expr, data))) => {
                if expr != default {
                    notes.push(format!(
                        "{place}: data ({view}) only with another value: {expr}"
                    ));
                }
                if i == 0 {
                    shown = Some((expr, data));
                }
            }
        }
    }
    let (expr, instant) = shown?;
    let instant_only =
        target["instant"].as_bool() == Some(true) && target["range"].as_bool() != Some(true);
    let range = match prom.query_range(&expr, at) {
        Err(e) => {
            fail(failures, &expr, format!("range query: {e}"));
            None
        }
        Ok(data) if series(&data).is_empty() && !instant_only => {
            fail(
                failures,
                &expr,
                format!("no data (range query over the last {RANGE_S}s)"),
            );
            None
        }
        Ok(data) => Some(data),
    };
    let mut results = series(&instant);
    if let Some(r) = &range {
        results.extend(series(r));
    }
    if results
        .iter()
        .all(|(_, pts)| pts.iter().all(|(_, v)| v.is_nan()))
    {
        notes.push(format!("{place}: every value is NaN: {expr}"));
    }
    // Names the agent does not export do not always mean no data: `sum by (typo)` still
    // answers. Every label the query or its legend names must exist.
    let (labels, created) = referenced_labels(&expr);
    for l in labels.difference(&created) {
        if !known_labels.contains(l) {
            fail(
                failures,
                &expr,
                format!("label {l:?} does not exist in Prometheus"),
            );
        }
    }
    let format = target["legendFormat"].as_str().unwrap_or("");
    for l in legend_labels(format) {
        if !results.iter().any(|(ls, _)| ls.contains_key(&l)) {
            fail(
                failures,
                &expr,
                format!("legend {format:?}: no series has label {l:?}"),
            );
        }
    }
    Some(Checked { expr, range })
}

fn dashboards_dir() -> PathBuf {
    std::env::var_os("STALLWATCH_DASHBOARDS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("dashboards"))
}

fn files_in(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
        })
        .collect();
    files.sort();
    files
}

/// Renders one panel from its range-query series to <dir>/<dashboard uid>/<panel id>.png.
fn write_preview(dir: &Path, uid: &str, panel: &Value, checked: &[(Checked, String)]) {
    let mut out = Vec::new();
    // A table's first query names its rows; the others are its extra columns.
    let targets = if panel["type"] == "table" {
        &checked[..checked.len().min(1)]
    } else {
        checked
    };
    for (c, format) in targets {
        for (labels, points) in c.range.as_ref().map(series).unwrap_or_default() {
            // NaN (a quantile of no events) and ±Inf are gaps.
            let points = points.into_iter().filter(|(_, v)| v.is_finite()).collect();
            out.push(preview::Series {
                label: legend(format, &labels),
                points,
            });
        }
    }
    let unit = preview::Unit::from_grafana(
        panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or(""),
    );
    let kind = match panel["type"].as_str().unwrap_or("") {
        "heatmap" => preview::PanelKind::Heatmap,
        "stat" => preview::PanelKind::Stat { unit },
        "table" => preview::PanelKind::Table { unit },
        "bargauge" => preview::PanelKind::BarGauge { unit },
        _ => preview::PanelKind::TimeSeries { unit },
    };
    let title = panel["title"].as_str().unwrap_or("");
    let d = dir.join(uid);
    std::fs::create_dir_all(&d).unwrap();
    let id = panel["id"].as_i64().unwrap_or(0);
    let path = d.join(format!("{id}.png"));
    let p = preview::Panel {
        title,
        kind,
        series: &out,
    };
    preview::render_png(&p, &path, 900, 320)
        .unwrap_or_else(|e| panic!("rendering {uid}/{id} ({title}): {e:#}"));
}

#[test]
fn every_dashboard_panel_and_rule_has_data_on_a_real_prometheus() {
    let Some(_guard) =
        kernel_or_skip("every_dashboard_panel_and_rule_has_data_on_a_real_prometheus")
    else {
        return;
    };
    let prometheus = Path::new(PROMETHEUS);
    let found = prometheus.exists().then(|| prometheus.to_path_buf());
    if tool_or_skip("kernel_dashboards", PROMETHEUS, "cargo xtask setup", found).is_none() {
        return;
    }
    // Go 1.19 (Debian: pauses with cause "unknown") and 1.27 (causes gc/other, and the
    // time to stop).
    let (Some(go119), Some(go127)) = (go_toolchain("debian"), go_toolchain("1.27.3")) else {
        return;
    };
    let t0 = Instant::now();
    let tmp = TempDir(std::env::temp_dir().join(format!("sw-dash-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    std::fs::create_dir_all(&tmp.0).unwrap();
    let bins = workspace_root().join("target/dashboard-tests");
    std::fs::create_dir_all(&bins).unwrap();
    let go_bins = [bins.join("gcpause"), bins.join("gcpause-new")];
    go_build(&go119, &[], HOST_GOARCH, &go_bins[0]);
    go_build(&go127, &[], HOST_GOARCH, &go_bins[1]);

    let dir = dashboards_dir();
    let dashboards = files_in(&dir, &["json"]);
    let mut rule_files = vec![workspace_root().join("deploy/alerts/stallwatch.rules.yaml")];
    rule_files.extend(files_in(&dir.join("rules"), &["yaml", "yml"]));
    eprintln!("dashboards {:?}, rule files {:?}", dashboards, rule_files);

    let api = FakeApi::start();
    let kubeconfig = api.kubeconfig(&tmp.0);
    let agent = Agent::start_with_env(
        &[
            "--probes",
            "sched,tcp,gc,syscalls",
            "--bpf-stats",
            "--node-name",
            NODE,
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );
    let mut cgs = Cgroups::default();
    let mut workloads = start_workloads(&mut cgs, &go_bins);
    let mut prom = Prometheus::start(&tmp.0, agent.addr, &rule_files);
    let scraping_since = Instant::now();

    // The agent names the pods and measures the Go programs.
    let ready = wait_until(WAIT, || {
        let m = agent.scrape();
        m.sum("stallwatch_kubernetes_synced", &[]) == 1.0
            && m.has_labels(
                "stallwatch_runqueue_latency_seconds_count",
                &[("pod", "late-0")],
            )
            && m.sum("stallwatch_runtime_processes", &[("runtime", "go")]) >= go_bins.len() as f64
    });
    assert!(
        ready,
        "the agent never synced the pods or found the Go programs; API requests {:?}\nlog:\n{}",
        api.requests(),
        agent.log()
    );
    std::thread::sleep(SCRAPING.saturating_sub(scraping_since.elapsed()));
    prom.check_alive();
    for w in &mut workloads.procs {
        assert!(w.running(), "workload {} exited early", w.pid);
    }
    let at = now();
    let checks = Instant::now();

    let targets = prom.api("/api/v1/targets").expect("/api/v1/targets");
    let health: Vec<(String, String)> = targets["activeTargets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t["health"].as_str().unwrap_or("").to_string(),
                t["lastError"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(
        health.len() == 1 && health[0].0 == "up",
        "the agent's scrape target: {health:?}\nprometheus log:\n{}",
        prom.log()
    );
    let known_labels: BTreeSet<String> = prom
        .api(&format!(
            "/api/v1/labels?start={:.3}&end={at:.3}",
            at - 600.0
        ))
        .expect("/api/v1/labels")
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.as_str().map(String::from))
        .collect();

    let mut failures = Vec::new();
    let mut notes = Vec::new();

    // Rules: every one loaded, evaluated without error, and every recording rule has data.
    let rules = prom.api("/api/v1/rules").expect("/api/v1/rules");
    let groups = rules["groups"].as_array().cloned().unwrap_or_default();
    for f in &rule_files {
        let f = f.display().to_string();
        if !groups.iter().any(|g| g["file"].as_str() == Some(&f)) {
            failures.push(Failure {
                place: f.clone(),
                expr: String::new(),
                error: "no rule group loaded from this file".into(),
            });
        }
    }
    let mut rule_count = 0;
    for g in &groups {
        for r in g["rules"].as_array().into_iter().flatten() {
            rule_count += 1;
            let place = format!(
                "{} group {} {} {}",
                g["file"].as_str().unwrap_or(""),
                g["name"].as_str().unwrap_or(""),
                r["type"].as_str().unwrap_or(""),
                r["name"].as_str().unwrap_or("")
            );
            let query = r["query"].as_str().unwrap_or("").to_string();
            if r["health"] != "ok" {
                failures.push(Failure {
                    place: place.clone(),
                    expr: query.clone(),
                    error: format!(
                        "health {}: {}",
                        r["health"],
                        r["lastError"].as_str().unwrap_or("")
                    ),
                });
            }
            if r["type"] == "recording" {
                let name = r["name"].as_str().unwrap_or("");
                match prom.query(name, at) {
                    Ok(d) if !series(&d).is_empty() => {}
                    Ok(_) => failures.push(Failure {
                        place,
                        expr: query,
                        error: format!("recording rule {name}: no data"),
                    }),
                    Err(e) => failures.push(Failure {
                        place,
                        expr: query,
                        error: e,
                    }),
                }
            }
        }
    }

    // Dashboards: every target of every panel.
    let preview = std::env::var_os("STALLWATCH_DASHBOARD_PREVIEW").map(PathBuf::from);
    let mut checked_targets = 0;
    for file in &dashboards {
        let text = std::fs::read_to_string(file).unwrap();
        let d: Value = match serde_json::from_str(&text) {
            Ok(d) => d,
            Err(e) => {
                failures.push(Failure {
                    place: file.display().to_string(),
                    expr: String::new(),
                    error: format!("not JSON: {e}"),
                });
                continue;
            }
        };
        // A dashboard exported for sharing wraps the model in {"dashboard": ...}.
        let d = if d["dashboard"].is_object() {
            d["dashboard"].clone()
        } else {
            d
        };
        let uid = d["uid"].as_str().unwrap_or("no-uid").to_string();
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let views = [false, true].map(|one| resolve_variables(&prom, &d, at, one));
        for (vars, view) in views.iter().zip(["default view", "test pod selected"]) {
            eprintln!("{name} (uid {uid}), {view}: {}", vars.notes.join("; "));
            for e in &vars.errors {
                failures.push(Failure {
                    place: format!("{name} uid={uid} variables ({view})"),
                    expr: String::new(),
                    error: e.clone(),
                });
            }
        }
        for panel in all_panels(&d) {
            let ptype = panel["type"].as_str().unwrap_or("");
            let title = panel["title"].as_str().unwrap_or("");
            let id = panel["id"].as_i64().unwrap_or(-1);
            let mut checked = Vec::new();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let place = format!(
                    "{name} uid={uid} panel {id} {title:?} ({ptype}) target {}",
                    target["refId"].as_str().unwrap_or("?")
                );
                let before = failures.len();
                if let Some(c) = check_target(
                    &prom,
                    &views,
                    target,
                    at,
                    &known_labels,
                    &place,
                    &mut failures,
                    &mut notes,
                ) {
                    let n = c.range.as_ref().map(|r| series(r).len()).unwrap_or(0);
                    let verdict = if failures.len() == before {
                        "ok"
                    } else {
                        "FAILED"
                    };
                    eprintln!("  {verdict} {place}: {n} series: {}", c.expr);
                    checked.push((c, target["legendFormat"].as_str().unwrap_or("").to_string()));
                } else if target["expr"]
                    .as_str()
                    .is_some_and(|e| !e.trim().is_empty())
                {
                    eprintln!("  FAILED {place}");
                }
                checked_targets += 1;
            }
            if panel["targets"].as_array().is_none_or(|t| t.is_empty())
                && !matches!(ptype, "row" | "text" | "news" | "dashlist")
            {
                notes.push(format!(
                    "{name} uid={uid} panel {id} {title:?} ({ptype}) has no targets"
                ));
            }
            // Panels whose queries failed too: the renderer shows them empty.
            let has_targets = panel["targets"].as_array().is_some_and(|t| !t.is_empty());
            if let (Some(dir), true) = (&preview, has_targets) {
                write_preview(dir, &uid, &panel, &checked);
            }
        }
    }
    prom.check_alive();
    eprintln!(
        "{} dashboards, {checked_targets} panel targets, {rule_count} rules checked in {:.0?} (test total {:.0?})",
        dashboards.len(),
        checks.elapsed(),
        t0.elapsed()
    );
    for w in &notes {
        eprintln!("note: {w}");
    }
    let report: Vec<String> = failures
        .iter()
        .map(|f| {
            if f.expr.is_empty() {
                format!("{}: {}", f.place, f.error)
            } else {
                format!("{}: {}\n    expr: {}", f.place, f.error, f.expr)
            }
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        report.join("\n")
    );
    drop(workloads);
    drop(agent);
}
