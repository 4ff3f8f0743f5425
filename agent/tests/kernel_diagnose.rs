//! Kernel tests of the host diagnosis commands: `stallwatch diagnose` (controlled workloads,
//! verdicts against what the workload does, the JSON schema, the text layout), `stallwatch
//! top` (driven in a real terminal through tmux, and as a plain table) and `stallwatch check`
//! without privileges.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn stallwatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stallwatch"))
        .args(args)
        .output()
        .expect("run stallwatch")
}

/// `stallwatch diagnose --pid P --duration D --json`, running while the test drives `pid`.
fn spawn_diagnose_json(pid: u32, duration: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_stallwatch"))
        .args([
            "diagnose",
            "--pid",
            &pid.to_string(),
            "--duration",
            duration,
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run stallwatch diagnose")
}

fn diagnose_json(pid: u32, duration: &str) -> Value {
    let out = stallwatch(&[
        "diagnose",
        "--pid",
        &pid.to_string(),
        "--duration",
        duration,
        "--json",
    ]);
    report(out)
}

/// A finished `diagnose --json`: it succeeded, and its output is JSON the schema accepts.
fn report(out: std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "diagnose failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("diagnose --json is JSON");
    validate(&schema(), &v, "$");
    v
}

fn schema() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/diagnose.schema.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The subset of JSON Schema that docs/diagnose.schema.json uses: type, const, enum,
/// required, properties, additionalProperties (false or a schema), items.
fn validate(s: &Value, v: &Value, at: &str) {
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => panic!("bad schema type at {at}"),
        };
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "number" => v.is_number(),
            "integer" => v.is_u64() || v.is_i64(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            other => panic!("unsupported schema type {other}"),
        });
        assert!(ok, "{at}: {v} is not {types:?}");
    }
    if let Some(c) = s.get("const") {
        assert_eq!(v, c, "{at}");
    }
    if let Some(Value::Array(e)) = s.get("enum") {
        assert!(e.contains(v), "{at}: {v} not in {e:?}");
    }
    if let Value::Object(obj) = v {
        if let Some(Value::Array(req)) = s.get("required") {
            for r in req {
                let r = r.as_str().unwrap();
                assert!(obj.contains_key(r), "{at}: missing {r}");
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => validate(ps, val, &format!("{at}.{k}")),
                None => match s.get("additionalProperties") {
                    Some(Value::Bool(false)) => panic!("{at}: unexpected key {k}"),
                    Some(extra @ Value::Object(_)) => validate(extra, val, &format!("{at}.{k}")),
                    _ => {}
                },
            }
        }
    }
    if let (Value::Array(items), Some(is)) = (v, s.get("items")) {
        for (i, item) in items.iter().enumerate() {
            validate(is, item, &format!("{at}[{i}]"));
        }
    }
}

fn pct(v: &Value, part: &str) -> f64 {
    let t = &v["time_seconds"];
    let total: f64 = ["on_cpu", "runqueue", "sleeping", "uninterruptible"]
        .iter()
        .map(|k| t[k].as_f64().unwrap())
        .sum();
    100.0 * t[part].as_f64().unwrap() / total
}

#[test]
fn a_cpu_contended_process_is_cpu_starved() {
    let Some(_g) = kernel_or_skip("a_cpu_contended_process_is_cpu_starved") else {
        return;
    };
    // Three spinning threads pinned to one CPU: each waits about two thirds of the time.
    let w = Workload::start(&["spin", "3", "6000", "0"]);
    let v = diagnose_json(w.pid, "2s");
    assert_eq!(v["verdict"]["kind"], "cpu_starved", "{v:#}");
    // Three runnable threads sharing one CPU: each waits about twice as long as it runs
    // (the fourth, main thread sleeps on a barrier all along).
    let t = &v["time_seconds"];
    let ratio = t["runqueue"].as_f64().unwrap() / t["on_cpu"].as_f64().unwrap();
    assert!(
        (1.5..2.5).contains(&ratio),
        "run-queue / on-CPU = {ratio}: {v:#}"
    );
    assert!(pct(&v, "sleeping") > 15.0, "the main thread's sleep: {v:#}");
    assert!(v["complete"].as_bool().unwrap());
    w.finish();
}

#[test]
fn a_process_sleeping_in_steps_is_sleeping() {
    let Some(_g) = kernel_or_skip("a_process_sleeping_in_steps_is_sleeping") else {
        return;
    };
    let w = Workload::start(&["sleep", "200", "50"]);
    let v = diagnose_json(w.pid, "2s");
    assert_eq!(v["verdict"]["kind"], "sleeping", "{v:#}");
    assert!(
        pct(&v, "sleeping") > 95.0,
        "voluntary off-CPU ≈ 100 %: {v:#}"
    );
    let sleep = v["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["class"] == "sleep")
        .expect("sleep syscalls seen");
    // 50 ms steps over ~2 s.
    let n = sleep["count"].as_u64().unwrap();
    assert!((30..=60).contains(&n), "{n} sleeps in 2 s of 50 ms steps");
    w.finish();
}

#[test]
fn a_process_stuck_in_d_since_before_the_window_is_io_blocked() {
    let Some(_g) = kernel_or_skip("a_process_stuck_in_d_since_before_the_window_is_io_blocked")
    else {
        return;
    };
    // The parent of a vfork waits in D until the child exits (8 s): it went into D before
    // diagnose attached and does not come out within the window, so no probe sees that
    // interval end; the kernel's accounting (/proc) does.
    let w = Workload::start(&["vfork", "8000"]);
    std::thread::sleep(Duration::from_millis(300));
    let v = diagnose_json(w.pid, "2s");
    assert_eq!(v["verdict"]["kind"], "io_blocked", "{v:#}");
    assert!(pct(&v, "uninterruptible") > 90.0, "{v:#}");
    w.finish();
}

#[test]
fn a_process_that_exits_mid_run_gets_a_partial_report() {
    let Some(_g) = kernel_or_skip("a_process_that_exits_mid_run_gets_a_partial_report") else {
        return;
    };
    // ~2 s of 50 ms sleeps, then it exits (its stdin is /dev/null), inside an 8 s window.
    let mut child = Command::new(env!("CARGO_BIN_EXE_swload"))
        .args(["sleep", "40", "50"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = spawn_diagnose_json(pid, "8s");
    // Reaped by us, so its /proc entry goes when it exits.
    std::thread::spawn(move || child.wait());
    let out = out.wait_with_output().unwrap();
    let v = report(out);
    assert_eq!(v["complete"], false, "{v:#}");
    assert!(v["note"].as_str().unwrap().contains("exited"), "{v:#}");
    assert!(v["duration_seconds"].as_f64().unwrap() < 8.0);
    assert_eq!(
        v["verdict"]["kind"], "sleeping",
        "what was seen is reported: {v:#}"
    );
}

/// The text report with numbers and bars masked.
fn masked(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        // Histogram rows and syscall-class rows vary in number with the data; the layout
        // test covers the fixed part.
        if line.trim_start().starts_with("usecs")
            || line.contains(" -> ")
            || line.contains(" calls ")
        {
            continue;
        }
        let mut prev_digit = false;
        let mut l = String::new();
        for c in line.chars() {
            let digit = c.is_ascii_digit() || (prev_digit && c == '.');
            if digit {
                if !prev_digit {
                    l.push('N');
                }
            } else if c != '#' {
                l.push(c);
            }
            prev_digit = digit;
        }
        // Column widths follow the numbers' widths: compare words, not alignment.
        out.push_str(&l.split_whitespace().collect::<Vec<_>>().join(" "));
        out.push('\n');
    }
    out
}

#[test]
fn text_report_layout_matches_the_golden_file() {
    let Some(_g) = kernel_or_skip("text_report_layout_matches_the_golden_file") else {
        return;
    };
    let w = Workload::start(&["sleep", "200", "50"]);
    let out = stallwatch(&["diagnose", "--pid", &w.pid.to_string(), "--duration", "1s"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let got = masked(&text);
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/diagnose_sleep.txt");
    if std::env::var("STALLWATCH_UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::write(&golden, &got).unwrap();
    }
    let want = std::fs::read_to_string(&golden).expect("golden file (STALLWATCH_UPDATE_GOLDEN=1)");
    assert_eq!(got, want, "full report:\n{text}");
    w.finish();
}

#[test]
fn errors_are_actionable() {
    let Some(_g) = kernel_or_skip("errors_are_actionable") else {
        return;
    };
    let out = stallwatch(&["diagnose", "--pid", "4000000", "--duration", "1s"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no process with pid 4000000"));
    let out = stallwatch(&["diagnose", "--comm", "no-such-comm-xyz"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no process named"));
    let out = stallwatch(&["diagnose"]);
    assert!(!out.status.success(), "a target is required");
    let _ = Duration::from_secs(0);
}

/// Runs `stallwatch args` as nobody, without capabilities.
fn unprivileged(args: &[&str]) -> Output {
    // The test binary lives under a directory nobody may not traverse (/root); copy it.
    let copy = std::env::temp_dir().join("stallwatch-unprivileged");
    std::fs::copy(env!("CARGO_BIN_EXE_stallwatch"), &copy).unwrap();
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&copy)
        .args(args)
        .output()
        .expect("setpriv (util-linux)")
}

#[test]
fn without_privileges_check_and_diagnose_name_the_missing_capabilities() {
    let Some(_g) =
        kernel_or_skip("without_privileges_check_and_diagnose_name_the_missing_capabilities")
    else {
        return;
    };
    let out = unprivileged(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "check must fail without privileges:\n{text}"
    );
    assert!(
        text.contains("CAP_BPF") && text.contains("CAP_PERFMON"),
        "names the capabilities:\n{text}"
    );
    assert!(text.contains("FAIL"), "{text}");
    let out = unprivileged(&["diagnose", "--pid", "1", "--duration", "1s"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CAP_BPF") && err.contains("run it as root"),
        "{err}"
    );
}

/// A detached tmux session (80×24) running `cmd`; killed on drop.
struct Tmux(String);

impl Tmux {
    fn start(cmd: &str) -> Tmux {
        let name = format!("sw-top-{}", std::process::id());
        let status = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                &name,
                "-x",
                "80",
                "-y",
                "24",
                cmd,
            ])
            .status()
            .expect("tmux (cargo xtask setup installs it)");
        assert!(status.success());
        Tmux(name)
    }
    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.0])
            .stderr(std::process::Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn keys(&self, keys: &[&str]) {
        for k in keys {
            let status = Command::new("tmux")
                .args(["send-keys", "-t", &self.0, k])
                .status()
                .unwrap();
            assert!(status.success());
        }
    }
    fn alive(&self) -> bool {
        Command::new("tmux")
            .args(["has-session", "-t", &self.0])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}

/// Data rows of the top screen: (pid, comm).
fn top_rows(screen: &str) -> Vec<(u32, String)> {
    screen
        .lines()
        .skip_while(|l| !l.starts_with("PID"))
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.to_string()))
        })
        .collect()
}

#[test]
fn top_in_a_terminal_ranks_the_starved_process_first_and_obeys_its_keys() {
    let Some(_g) =
        kernel_or_skip("top_in_a_terminal_ranks_the_starved_process_first_and_obeys_its_keys")
    else {
        return;
    };
    let w = Workload::start(&["spin", "3", "40000", "0"]);
    let t = Tmux::start(&format!(
        "{} top --interval 1s --sort runq",
        env!("CARGO_BIN_EXE_stallwatch")
    ));
    let first = || top_rows(&t.screen()).first().map(|r| r.0);
    assert!(
        wait_until(Duration::from_secs(30), || first() == Some(w.pid)),
        "the contended workload {} never ranked first:\n{}",
        w.pid,
        t.screen()
    );
    let screen = t.screen();
    assert!(screen.lines().all(|l| l.chars().count() <= 80), "{screen}");
    assert!(screen.contains("q quit"), "help line on screen:\n{screen}");
    // Filter by comm.
    t.keys(&["/", "-l", "swload", "Enter"]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s = t.screen();
            let rows = top_rows(&s);
            s.contains("filter:swload") && !rows.is_empty() && rows.iter().all(|r| r.1 == "swload")
        }),
        "filter did not apply:\n{}",
        t.screen()
    );
    // Sort keys.
    t.keys(&["2"]);
    assert!(
        wait_until(Duration::from_secs(5), || t.screen().contains("sort:wait")),
        "{}",
        t.screen()
    );
    t.keys(&["q"]);
    assert!(
        wait_until(Duration::from_secs(10), || !t.alive()),
        "q did not quit:\n{}",
        t.screen()
    );
    drop(w);
}

#[test]
fn top_once_prints_a_plain_table_for_pipes() {
    let Some(_g) = kernel_or_skip("top_once_prints_a_plain_table_for_pipes") else {
        return;
    };
    let w = Workload::start(&["spin", "3", "20000", "0"]);
    let out = stallwatch(&["top", "--once", "--interval", "2s", "--sort", "wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rows = top_rows(&text);
    assert_eq!(rows.first().map(|r| r.0), Some(w.pid), "{text}");
    assert!(
        text.lines().next().unwrap().contains("sorted by wait"),
        "{text}"
    );
    drop(w);
}

#[test]
fn diagnose_reports_a_go_programs_gc_pauses() {
    let Some(_g) = kernel_or_skip("diagnose_reports_a_go_programs_gc_pauses") else {
        return;
    };
    let Some(go) = go_toolchain("1.27.3") else {
        return;
    };
    let dir = workspace_root().join("target/gc-tests/diagnose");
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("gcpause");
    go_build(&go, &[], HOST_GOARCH, &bin);
    let mut child = Command::new(&bin)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let diag = spawn_diagnose_json(pid, "4s");
    // Forced GCs throughout the window (the first ones may land before the probes attach).
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        for _ in 0..40 {
            writeln!(stdin, "gc").unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let out = diag.wait_with_output().unwrap();
    drop(child.stdin.take());
    let _ = child.wait();
    let v = report(out);
    let gc = v["pauses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["runtime"] == "go" && p["cause"] == "gc")
        .unwrap_or_else(|| panic!("no Go GC pauses in {v:#}"));
    // ~40 cycles of two stop-the-world pauses each, most of them inside the window.
    let n = gc["count"].as_u64().unwrap();
    assert!(n >= 20, "{n} pauses: {v:#}");
    assert!(v["paused_percent_of_wall"].as_f64().unwrap() > 0.0);
}
