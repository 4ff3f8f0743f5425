//! dashboards/: the Grafana dashboards and their recording rules agree with what the agent
//! exports (docs/metrics.md, generated from the agent's catalogue) and keep the shape the
//! README promises: stable uids, a `datasource` variable used everywhere (no data source uid
//! baked in), the namespace/pod/container/comm variables, unique panel ids, queries that parse.
//!
//! No root needed. promtool (Debian's prometheus, from `cargo xtask setup`) checks and
//! unit-tests the recording rules and parses every dashboard query; without it those tests
//! skip with a message, and fail under STALLWATCH_REQUIRE_KERNEL=1 (CI), where nothing may
//! skip. The rest is plain Rust: serde_json for the dashboards and a small PromQL reader
//! (below) that knows which labels each part of a query can carry.
//!
//! This file does not use tests/common (the kernel-test harness): it needs only the
//! workspace root.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::{metric_catalogue, promtool, run_promtool, workspace_root};
use serde_json::Value;

/// Every dashboard file and its uid. The uids are in links, bookmarks and the preview images'
/// paths (docs/dashboards/<uid>/...): they must not change.
const DASHBOARDS: &[(&str, &str)] = &[
    ("agent-health.json", "stallwatch-agent"),
    ("node-overview.json", "stallwatch-node"),
    ("runtime-pauses.json", "stallwatch-runtime"),
    ("workload.json", "stallwatch-workload"),
];
const RECORDING_RULES: &str = "dashboards/rules/stallwatch.recording.rules.yaml";
const RECORDING_RULES_TEST: &str = "dashboards/rules/tests/stallwatch.recording.rules.test.yaml";
/// What every panel, target and query variable names as its data source.
const DATASOURCE_UID: &str = "${datasource}";
/// Template variables narrowing per-process series, in this order; their All is ".*", which
/// also matches a label a series does not have (host processes have no namespace or pod).
const PROCESS_VARIABLES: &[&str] = &["namespace", "pod", "container", "comm"];
/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["instance", "job"];
/// Series the dashboards use that docs/metrics.md does not list: Prometheus' own, and the
/// standard process_* metrics the agent exports about itself (docs/metrics.md says so).
const OTHER_METRICS: &[&str] = &[
    "scrape_duration_seconds",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
];
/// Grafana's own variables that queries may use.
const GRAFANA_VARIABLES: &[&str] = &["__rate_interval", "__interval", "__range"];

fn read(rel: &str) -> String {
    let path = workspace_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// The dashboards

struct Dashboard {
    file: String,
    json: Value,
}

/// Every dashboards/*.json, parsed.
fn dashboards() -> Vec<Dashboard> {
    let dir = workspace_root().join("dashboards");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let text = read(&format!("dashboards/{file}"));
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("dashboards/{file} is not valid JSON: {e}"));
            Dashboard { file, json }
        })
        .collect()
}

fn dashboard(uid: &str) -> Dashboard {
    dashboards()
        .into_iter()
        .find(|d| d.json["uid"] == uid)
        .unwrap_or_else(|| panic!("no dashboard with uid {uid}"))
}

/// Every panel, those inside rows included, with the id of the row it sits in (rows
/// themselves have none). An expanded row's panels follow it in the top-level list (by
/// position); a collapsed row carries its panels in its own `panels`.
fn panels(d: &Value) -> Vec<(Option<i64>, &Value)> {
    let mut top: Vec<&Value> = d["panels"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    top.sort_by_key(|p| (p["gridPos"]["y"].as_i64(), p["gridPos"]["x"].as_i64()));
    let mut out = Vec::new();
    let mut row = None;
    for p in top {
        if p["type"] == "row" {
            out.push((None, p));
            row = p["id"].as_i64();
            for nested in p["panels"].as_array().into_iter().flatten() {
                out.push((row, nested));
            }
        } else {
            out.push((row, p));
        }
    }
    out
}

fn title(p: &Value) -> String {
    format!("panel {} {:?}", p["id"], p["title"].as_str().unwrap_or(""))
}

fn targets(p: &Value) -> Vec<&Value> {
    p["targets"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn variables(d: &Value) -> Vec<&Value> {
    d["templating"]["list"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn variable<'a>(d: &'a Value, name: &str) -> Option<&'a Value> {
    variables(d).into_iter().find(|v| v["name"] == name)
}

/// A query variable's query: a string, or Grafana's newer `{query: ...}` object.
fn variable_query(v: &Value) -> &str {
    v["query"]
        .as_str()
        .or(v["query"]["query"].as_str())
        .unwrap_or("")
}

/// `label_values(<selector>, <label>)` split in its two parts.
fn label_values(q: &str) -> Option<(&str, &str)> {
    let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (sel, label) = inner.rsplit_once(',')?;
    Some((sel.trim(), label.trim()))
}

/// Every PromQL query of a dashboard with where it is: targets' exprs, and the selectors of
/// `label_values` variables.
fn queries(d: &Dashboard) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (_, p) in panels(&d.json) {
        for t in targets(p) {
            let expr = t["expr"].as_str().unwrap_or("").to_string();
            out.push((
                format!("{} {} target {}", d.file, title(p), t["refId"]),
                expr,
            ));
        }
    }
    for v in variables(&d.json) {
        if let Some((sel, _)) = label_values(variable_query(v)) {
            out.push((
                format!("{} variable {}", d.file, v["name"]),
                sel.to_string(),
            ));
        }
    }
    out
}

/// Names of Grafana variables (`$x`, `${x}`, `${x:format}`) used in `s`.
fn variable_refs(s: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        let braced = rest.starts_with('{');
        let body = if braced { &rest[1..] } else { rest };
        let name: String = body
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// docs/metrics.md and the recording rules: what each series name may carry

/// The labels docs/metrics.md's header paragraph gives per-process series (those carrying
/// `comm`): every back-quoted label name in the paragraph that starts "Per-process series".
fn per_process_labels() -> BTreeSet<String> {
    let text = read("docs/metrics.md");
    let para = text
        .split("\n\n")
        .find(|p| p.trim_start().starts_with("Per-process series"))
        .expect("docs/metrics.md: no paragraph starting \"Per-process series\"");
    let labels: BTreeSet<String> = para
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(str::to_string)
        .collect();
    for l in ["comm", "cgroup", "pid", "namespace", "pod", "container"] {
        assert!(
            labels.contains(l),
            "docs/metrics.md's per-process paragraph parsed to {labels:?}: no {l}"
        );
    }
    labels
}

/// Every series name the agent exports (histograms as _bucket/_sum/_count) and the other
/// metrics the dashboards may use, with the labels each can carry.
fn exported_series() -> BTreeMap<String, BTreeSet<String>> {
    let per_process = per_process_labels();
    let mut out = BTreeMap::new();
    for (name, (kind, labels)) in metric_catalogue() {
        let mut labels: BTreeSet<String> = labels;
        if labels.contains("comm") {
            labels.extend(per_process.iter().cloned());
        }
        labels.extend(TARGET_LABELS.iter().map(|l| l.to_string()));
        if kind == "histogram" {
            let mut bucket = labels.clone();
            bucket.insert("le".to_string());
            out.insert(format!("{name}_bucket"), bucket);
            out.insert(format!("{name}_sum"), labels.clone());
            out.insert(format!("{name}_count"), labels);
        } else {
            out.insert(name, labels);
        }
    }
    assert!(
        out.get("stallwatch_runqueue_latency_seconds_bucket")
            .is_some_and(|l| l.contains("comm") && l.contains("le")),
        "docs/metrics.md parsed to nothing useful: {:?}",
        out.keys()
    );
    for m in OTHER_METRICS {
        out.insert(
            m.to_string(),
            TARGET_LABELS.iter().map(|l| l.to_string()).collect(),
        );
    }
    out
}

struct RecordingRule {
    record: String,
    expr: String,
}

/// The rules of the recording rules file. A reader for the plain layout that file keeps
/// (`- record: NAME` then `expr:` with a one-line value or a `|` block); promtool checks
/// the YAML itself, and `rules_pass_promtool_check` that both count the same rules.
fn recording_rules() -> Vec<RecordingRule> {
    let text = read(RECORDING_RULES);
    let lines: Vec<&str> = text.lines().collect();
    let mut rules: Vec<(String, Option<String>)> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        let indent = lines[i].len() - t.len();
        assert!(
            !t.starts_with("- alert:") && !t.starts_with("alert:"),
            "{RECORDING_RULES}: alerting rules belong in deploy/alerts/stallwatch.rules.yaml"
        );
        if let Some(name) = t.strip_prefix("- record:").or(t.strip_prefix("record:")) {
            rules.push((name.trim().to_string(), None));
        } else if let Some(v) = t.strip_prefix("expr:") {
            let v = v.trim();
            let expr = if v.starts_with('|') || v.starts_with('>') {
                let mut body = Vec::new();
                while let Some(next) = lines.get(i + 1) {
                    let nt = next.trim_start();
                    if !nt.is_empty() && next.len() - nt.len() <= indent {
                        break;
                    }
                    body.push(nt);
                    i += 1;
                }
                body.join("\n")
            } else {
                v.to_string()
            };
            let last = rules
                .last_mut()
                .unwrap_or_else(|| panic!("{RECORDING_RULES}: expr before any record"));
            assert!(
                last.1.is_none(),
                "{RECORDING_RULES}: {} has two exprs",
                last.0
            );
            last.1 = Some(expr);
        }
        i += 1;
    }
    rules
        .into_iter()
        .map(|(record, expr)| {
            let expr = expr.unwrap_or_else(|| panic!("{RECORDING_RULES}: {record} has no expr"));
            assert!(!expr.trim().is_empty(), "{record}: empty expr");
            RecordingRule { record, expr }
        })
        .collect()
}

/// The exported series plus every recorded series, with the labels its rule leaves on it
/// (rules may use earlier rules). Problems in the rules' own expressions are returned.
fn known_series() -> (BTreeMap<String, BTreeSet<String>>, Vec<String>) {
    let mut known = exported_series();
    let mut problems = Vec::new();
    for rule in recording_rules() {
        let ctx = format!("{RECORDING_RULES} {}", rule.record);
        let expr = match promql::parse(&rule.expr) {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("{ctx}: {e}"));
                continue;
            }
        };
        match promql::labels(&expr, &known, &ctx, &mut problems) {
            Some(labels) => {
                known.insert(rule.record.clone(), labels);
            }
            None => problems.push(format!("{ctx}: the expression is a scalar")),
        }
    }
    (known, problems)
}

// ---------------------------------------------------------------------------------------
// Tests: the files

#[test]
fn dashboards_are_valid_json_with_stable_uids() {
    let all = dashboards();
    let files: Vec<&str> = all.iter().map(|d| d.file.as_str()).collect();
    let expected: Vec<&str> = DASHBOARDS.iter().map(|(f, _)| *f).collect();
    assert_eq!(files, expected, "dashboards/*.json");
    let mut uids = BTreeSet::new();
    for d in &all {
        let uid = d.json["uid"].as_str().unwrap_or("");
        assert!(!uid.is_empty(), "{}: no uid", d.file);
        assert!(uids.insert(uid), "{}: uid {uid} used twice", d.file);
        let (_, want) = DASHBOARDS.iter().find(|(f, _)| *f == d.file).unwrap();
        assert_eq!(
            uid, *want,
            "{}: uid changed (links and bookmarks use it)",
            d.file
        );
        assert!(
            d.json["schemaVersion"].as_i64().is_some_and(|v| v >= 39),
            "{}: schemaVersion {} < 39",
            d.file,
            d.json["schemaVersion"]
        );
        assert!(
            d.json["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "stallwatch")),
            "{}: tags must include \"stallwatch\"",
            d.file
        );
        assert!(
            d.json["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{}: no title",
            d.file
        );
        // Grafana assigns the database id on import; a fixed one would clash.
        assert!(d.json["id"].is_null(), "{}: id must be null", d.file);
    }
}

#[test]
fn panel_ids_are_unique_within_a_dashboard() {
    for d in dashboards() {
        let mut seen = BTreeMap::new();
        let all = panels(&d.json);
        assert!(all.len() > 3, "{}: found only {} panels", d.file, all.len());
        for (_, p) in all {
            let id = p["id"]
                .as_i64()
                .unwrap_or_else(|| panic!("{}: {} has no numeric id", d.file, title(p)));
            if let Some(other) = seen.insert(id, title(p)) {
                panic!("{}: id {id} used by {other} and {}", d.file, title(p));
            }
        }
    }
}

/// Every `datasource` in the file, at any depth.
fn datasources<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "datasource" {
                    out.push((format!("{path}.datasource"), v));
                }
                datasources(v, format!("{path}.{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                datasources(v, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_query_uses_the_datasource_variable() {
    let want = serde_json::json!({"type": "prometheus", "uid": DATASOURCE_UID});
    for d in dashboards() {
        // No data source uid anywhere but the variable: a hard-coded one breaks every
        // Grafana whose Prometheus has another uid.
        let mut found = Vec::new();
        datasources(&d.json, String::new(), &mut found);
        for (path, ds) in &found {
            assert_eq!(
                *ds, &want,
                "{}{path}: data source must be {want} (the `datasource` variable)",
                d.file
            );
        }
        for (_, p) in panels(&d.json) {
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(p["datasource"], want, "{} {}: datasource", d.file, title(p));
            let ts = targets(p);
            assert!(!ts.is_empty(), "{} {}: no targets", d.file, title(p));
            for t in ts {
                assert_eq!(
                    t["datasource"],
                    want,
                    "{} {} target {}: datasource",
                    d.file,
                    title(p),
                    t["refId"]
                );
            }
        }
        for v in variables(&d.json) {
            if v["type"] == "query" {
                assert_eq!(v["datasource"], want, "{} variable {}", d.file, v["name"]);
            }
        }
        let var = variable(&d.json, "datasource")
            .unwrap_or_else(|| panic!("{}: no `datasource` variable", d.file));
        assert_eq!(var["type"], "datasource", "{}: variable datasource", d.file);
        assert_eq!(
            var["query"], "prometheus",
            "{}: variable datasource",
            d.file
        );
        assert!(
            found.len() > 5,
            "{}: the datasource walk found {found:?}",
            d.file
        );
    }
}

#[test]
fn template_variables_select_node_and_workload() {
    for d in dashboards() {
        let vars = variables(&d.json);
        let names: Vec<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
        let instance = variable(&d.json, "instance")
            .unwrap_or_else(|| panic!("{}: no `instance` variable", d.file));
        assert_eq!(
            variable_query(instance),
            "label_values(stallwatch_build_info, instance)",
            "{}: instance",
            d.file
        );
        assert!(
            instance["multi"] == true && instance["includeAll"] == true,
            "{}: instance must be multi-value with All",
            d.file
        );
        for (i, name) in PROCESS_VARIABLES.iter().enumerate() {
            let v = variable(&d.json, name)
                .unwrap_or_else(|| panic!("{}: no `{name}` variable", d.file));
            assert_eq!(v["type"], "query", "{}: {name}", d.file);
            assert_eq!(v["includeAll"], true, "{}: {name} needs All", d.file);
            // Not Grafana's default (a regex of every value listed): that would leave out
            // series without the label, i.e. every host process.
            assert_eq!(v["allValue"], ".*", "{}: {name} allValue", d.file);
            let (_, label) = label_values(variable_query(v)).unwrap_or_else(|| {
                panic!(
                    "{}: {name}: not label_values(...): {}",
                    d.file,
                    variable_query(v)
                )
            });
            assert_eq!(label, *name, "{}: {name} lists another label", d.file);
            // Grafana shows `definition` in the editor; it must be the query that runs.
            assert!(
                v["definition"].is_null() || v["definition"] == variable_query(v),
                "{}: {name}: definition {} differs from the query {}",
                d.file,
                v["definition"],
                variable_query(v)
            );
            let refs = variable_refs(variable_query(v));
            for earlier in std::iter::once(&"instance").chain(&PROCESS_VARIABLES[..i]) {
                assert!(
                    refs.contains(*earlier),
                    "{}: {name} is not narrowed by ${earlier}: {}",
                    d.file,
                    variable_query(v)
                );
            }
        }
        // A variable can only use variables defined before it.
        for (i, v) in vars.iter().enumerate() {
            for r in variable_refs(variable_query(v))
                .iter()
                .chain(variable_refs(v["datasource"]["uid"].as_str().unwrap_or("")).iter())
            {
                assert!(
                    names[..i].contains(&r.as_str()),
                    "{}: variable {} uses ${r}, which is not defined before it ({names:?})",
                    d.file,
                    v["name"]
                );
            }
        }
        // Every variable a query or title uses exists.
        let text = d.json.to_string();
        for r in variable_refs(&text) {
            assert!(
                names.contains(&r.as_str())
                    || GRAFANA_VARIABLES.contains(&r.as_str())
                    || r.starts_with("__"),
                "{}: ${r} is used but not defined ({names:?})",
                d.file
            );
        }
    }
    let agent = dashboard("stallwatch-agent");
    let job = variable(&agent.json, "job").expect("agent health: no `job` variable");
    assert_eq!(
        variable_query(job),
        "label_values(stallwatch_build_info, job)"
    );
}

#[test]
fn every_target_has_an_expression_and_every_panel_says_what_it_answers() {
    for d in dashboards() {
        for (_, p) in panels(&d.json) {
            if p["type"] == "row" {
                continue;
            }
            let desc = p["description"].as_str().unwrap_or("");
            assert!(
                desc.contains('?'),
                "{} {}: the description should ask the question the panel answers: {desc:?}",
                d.file,
                title(p)
            );
            let mut refs = BTreeSet::new();
            for t in targets(p) {
                assert!(
                    t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                    "{} {} target {}: empty expr",
                    d.file,
                    title(p),
                    t["refId"]
                );
                assert!(
                    refs.insert(t["refId"].as_str().unwrap_or("").to_string()),
                    "{} {}: refId {} twice",
                    d.file,
                    title(p),
                    t["refId"]
                );
            }
        }
    }
}

#[test]
fn panels_fit_the_grid_without_overlapping() {
    for d in dashboards() {
        // Top-level panels share one grid; a collapsed row's panels another, each.
        let mut grids: BTreeMap<Option<i64>, Vec<&Value>> = BTreeMap::new();
        for p in d.json["panels"].as_array().expect("panels") {
            grids.entry(None).or_default().push(p);
            if p["type"] == "row" && p["collapsed"] == true {
                for n in p["panels"].as_array().into_iter().flatten() {
                    grids.entry(p["id"].as_i64()).or_default().push(n);
                }
            } else if p["type"] == "row" {
                assert!(
                    p["panels"].as_array().is_none_or(|a| a.is_empty()),
                    "{} {}: an expanded row keeps its panels after it, not inside",
                    d.file,
                    title(p)
                );
            }
        }
        for grid in grids.values() {
            let rect = |p: &Value| {
                let g = &p["gridPos"];
                let r = [&g["x"], &g["y"], &g["w"], &g["h"]].map(|v| v.as_i64().unwrap_or(-1));
                assert!(
                    r[0] >= 0 && r[1] >= 0 && r[2] > 0 && r[3] > 0 && r[0] + r[2] <= 24,
                    "{} {}: gridPos {g}",
                    d.file,
                    title(p)
                );
                r
            };
            for (i, a) in grid.iter().enumerate() {
                let [ax, ay, aw, ah] = rect(a);
                for b in &grid[i + 1..] {
                    let [bx, by, bw, bh] = rect(b);
                    let apart = ax + aw <= bx || bx + bw <= ax || ay + ah <= by || by + bh <= ay;
                    assert!(apart, "{}: {} overlaps {}", d.file, title(a), title(b));
                }
            }
        }
    }
}

#[test]
fn workload_shows_pauses_beside_run_queue_latency() {
    let d = dashboard("stallwatch-workload");
    let find = |metric: &str| {
        let found: Vec<(Option<i64>, &Value)> = panels(&d.json)
            .into_iter()
            .filter(|(_, p)| {
                targets(p)
                    .iter()
                    .any(|t| t["expr"].as_str().is_some_and(|e| e.contains(metric)))
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "workload: expected one panel on {metric}, found {:?}",
            found.iter().map(|(_, p)| title(p)).collect::<Vec<_>>()
        );
        found[0]
    };
    let (runq_row, runq) = find("stallwatch_runqueue_latency_seconds_bucket");
    let (pause_row, pause) = find("stallwatch_runtime_pause_seconds_bucket");
    let (a, b) = (&runq["gridPos"], &pause["gridPos"]);
    assert!(
        runq_row.is_some(),
        "workload: the run-queue panel is in no row"
    );
    assert_eq!(
        runq_row, pause_row,
        "workload: run-queue and pause panels in different rows"
    );
    assert_eq!(
        a["y"], b["y"],
        "workload: run-queue {a} and pause {b} not side by side"
    );
    assert_eq!(
        a["h"], b["h"],
        "workload: run-queue {a} and pause {b} heights"
    );
    assert_eq!(
        a["w"], b["w"],
        "workload: run-queue {a} and pause {b} widths"
    );
    let (ax, bx, w) = (
        a["x"].as_i64().unwrap(),
        b["x"].as_i64().unwrap(),
        a["w"].as_i64().unwrap(),
    );
    assert_eq!(
        (ax - bx).abs(),
        w,
        "workload: run-queue {a} and pause {b} not adjacent"
    );
}

// ---------------------------------------------------------------------------------------
// Tests: the queries

/// The base names of every `stallwatch_...` name in `expr` (histogram series suffixes
/// stripped where the catalogue has the histogram).
fn stallwatch_names(expr: &str, histograms: &BTreeSet<&str>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let is_name = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut i = 0;
    while let Some(at) = expr[i..].find("stallwatch_") {
        let start = i + at;
        let mut end = start + "stallwatch_".len();
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_')
        {
            end += 1;
        }
        if start == 0 || !is_name(b[start - 1]) {
            let name = &expr[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|base| histograms.contains(base))
                })
                .unwrap_or(name);
            out.insert(base.to_string());
        }
        i = end;
    }
    out
}

#[test]
fn every_metric_is_in_the_metric_catalogue() {
    let catalogue = metric_catalogue();
    let histograms: BTreeSet<&str> = catalogue
        .iter()
        .filter(|(_, (kind, _))| kind == "histogram")
        .map(|(n, _)| n.as_str())
        .collect();
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    let mut all: Vec<(String, String)> = dashboards().iter().flat_map(queries).collect();
    all.extend(
        recording_rules()
            .into_iter()
            .map(|r| (format!("{RECORDING_RULES} {}", r.record), r.expr)),
    );
    for (ctx, expr) in all {
        for name in stallwatch_names(&expr, &histograms) {
            if !catalogue.contains_key(&name) {
                problems.push(format!("{ctx}: {name} is not in docs/metrics.md"));
            }
            used.insert(name);
        }
    }
    assert!(
        problems.is_empty(),
        "metrics the agent does not export (renamed or removed?): {problems:#?}"
    );
    assert!(
        used.contains("stallwatch_runqueue_latency_seconds")
            && used.contains("stallwatch_build_info"),
        "the name scan found too little: {used:?}"
    );
}

#[test]
fn every_label_exists_on_its_metric() {
    let (known, mut problems) = known_series();
    let mut used = BTreeSet::new();
    for d in dashboards() {
        for (ctx, expr) in queries(&d) {
            let parsed = match promql::parse(&expr) {
                Ok(e) => e,
                Err(e) => {
                    problems.push(format!("{ctx}: {e}\n  {expr}"));
                    continue;
                }
            };
            if promql::labels(&parsed, &known, &ctx, &mut problems).is_none() {
                problems.push(format!("{ctx}: a scalar, not series"));
            }
            promql::visit(&parsed, &mut |e| {
                if let promql::Expr::Selector { name: Some(n), .. } = e {
                    used.insert(n.clone());
                }
            });
        }
        // label_values(<selector>, <label>): the label is one the selector's metric has.
        for v in variables(&d.json) {
            if let Some((sel, label)) = label_values(variable_query(v)) {
                let labels = promql::parse(sel)
                    .ok()
                    .and_then(|e| promql::labels(&e, &known, "", &mut Vec::new()));
                if !labels.is_some_and(|l| l.contains(label)) {
                    problems.push(format!(
                        "{} variable {}: {sel} has no label {label}",
                        d.file, v["name"]
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "queries use labels or series that do not exist: {problems:#?}"
    );
    for rule in recording_rules() {
        assert!(
            used.contains(&rule.record),
            "{RECORDING_RULES}: {} is used by no dashboard",
            rule.record
        );
    }
    assert!(used.len() > 20, "the parser found too few series: {used:?}");
}

#[test]
fn queries_follow_the_dashboard_conventions() {
    let exported = exported_series();
    let mut problems = Vec::new();
    for d in dashboards() {
        for (_, p) in panels(&d.json) {
            for t in targets(p) {
                let ctx = format!("{} {} target {}", d.file, title(p), t["refId"]);
                let Ok(expr) = promql::parse(t["expr"].as_str().unwrap_or("")) else {
                    continue; // every_label_exists_on_its_metric reports it
                };
                if p["type"] == "heatmap" {
                    // Buckets as Grafana's heatmap wants them: counts per interval, by le.
                    if t["format"] != "heatmap" {
                        problems.push(format!("{ctx}: a heatmap target needs format heatmap"));
                    }
                    if !promql::is_sum_by_le_of(&expr, "increase") {
                        problems.push(format!(
                            "{ctx}: not sum by (le) (increase(<metric>_bucket{{...}}[$__rate_interval]))"
                        ));
                    }
                }
                promql::visit(&expr, &mut |e| match e {
                    promql::Expr::Call { func, args }
                        if func == "histogram_quantile"
                            && !args
                                .get(1)
                                .is_some_and(|a| promql::is_sum_by_le_of(a, "rate")) =>
                    {
                        problems.push(format!(
                            "{ctx}: histogram_quantile over something else than \
                             sum by (le, ...) (rate(<metric>_bucket{{...}}[$__rate_interval]))"
                        ));
                    }
                    promql::Expr::Selector {
                        name: Some(name),
                        matchers,
                        range,
                    } => {
                        // `=` would not match All (".*"), nor `=~` on the literal text.
                        for m in matchers {
                            if m.value.contains('$') && !m.op.ends_with('~') {
                                problems.push(format!(
                                    "{ctx}: {}{}{:?} compares a variable without =~",
                                    m.label, m.op, m.value
                                ));
                            }
                        }
                        // Raw per-process series honour the whole selection.
                        let is_process = exported.get(name).is_some_and(|l| l.contains("comm"));
                        if is_process {
                            for var in
                                std::iter::once("instance").chain(PROCESS_VARIABLES.iter().copied())
                            {
                                let want = format!("${var}");
                                if !matchers
                                    .iter()
                                    .any(|m| m.label == var && m.op == "=~" && m.value == want)
                                {
                                    problems.push(format!(
                                        "{ctx}: {name} is not filtered by {var}=~\"{want}\""
                                    ));
                                }
                            }
                        }
                        if let Some(r) = range {
                            if !r.starts_with('$') {
                                problems.push(format!(
                                    "{ctx}: {name}[{r}]: use $__rate_interval (or $__range), not a fixed window"
                                ));
                            }
                        }
                    }
                    _ => {}
                });
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn node_overview_top_stalled_table_uses_recording_rules() {
    let d = dashboard("stallwatch-node");
    let (_, table) = panels(&d.json)
        .into_iter()
        .find(|(_, p)| {
            p["type"] == "table" && p["title"].as_str().is_some_and(|t| t.contains("stalled"))
        })
        .expect("node overview: no \"top stalled\" table");
    let exprs: Vec<&str> = targets(table)
        .iter()
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(
        exprs.iter().all(|e| e.contains("stallwatch:")),
        "top stalled table should read recording rules only: {exprs:#?}"
    );
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("topk(") && e.contains("stallwatch:stall_seconds:")),
        "top stalled table: no topk over the stall total: {exprs:#?}"
    );
}

#[test]
fn provisioning_points_grafana_at_the_dashboards() {
    let ds = read("dashboards/provisioning/datasources/stallwatch.yaml");
    for want in [
        "type: prometheus",
        "uid: prometheus",
        "url: ${PROMETHEUS_URL}",
    ] {
        assert!(ds.contains(want), "datasource provisioning lacks {want:?}");
    }
    let dash = read("dashboards/provisioning/dashboards/stallwatch.yaml");
    for want in ["type: file", "path: /var/lib/grafana/dashboards/stallwatch"] {
        assert!(dash.contains(want), "dashboard provisioning lacks {want:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Tests: promtool

#[test]
fn recording_rules_pass_promtool_check() {
    let Some(promtool) = promtool("recording_rules_pass_promtool_check") else {
        return;
    };
    let (ok, out) = run_promtool(&promtool, &["check", "rules", RECORDING_RULES]);
    assert!(ok, "promtool check rules {RECORDING_RULES}:\n{out}");
    // The reader above and promtool see the same rules.
    let n = recording_rules().len();
    assert!(
        out.contains(&format!("SUCCESS: {n} rules found")),
        "this test read {n} rules, promtool says:\n{out}"
    );
}

#[test]
fn recording_rules_unit_tests_pass() {
    let Some(promtool) = promtool("recording_rules_unit_tests_pass") else {
        return;
    };
    let (ok, out) = run_promtool(&promtool, &["test", "rules", RECORDING_RULES_TEST]);
    assert!(ok, "promtool test rules {RECORDING_RULES_TEST}:\n{out}");
    // Every rule has expectations.
    let tests = read(RECORDING_RULES_TEST);
    for rule in recording_rules() {
        assert!(
            tests.contains(&format!("expr: {}", rule.record)),
            "{RECORDING_RULES_TEST}: no promql_expr_test for {}",
            rule.record
        );
    }
}

#[test]
fn dashboard_queries_parse_in_prometheus() {
    let Some(promtool) = promtool("dashboard_queries_parse_in_prometheus") else {
        return;
    };
    // Every query as a recording rule, with Grafana's interval variables filled in: promtool
    // parses and type-checks each with Prometheus' own parser.
    let mut file = String::from("groups:\n  - name: dashboard-queries\n    rules:\n");
    let mut all = Vec::new();
    for d in dashboards() {
        all.extend(queries(&d));
    }
    for (i, (ctx, expr)) in all.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h");
        file.push_str(&format!(
            "      # {ctx}\n      - record: dashboard:query_{i}\n        expr: |\n"
        ));
        for line in expr.lines() {
            file.push_str(&format!("          {line}\n"));
        }
    }
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-queries.rules.yaml");
    std::fs::write(&path, &file).unwrap();
    let (ok, out) = run_promtool(&promtool, &["check", "rules", path.to_str().unwrap()]);
    assert!(
        ok,
        "dashboard queries that Prometheus rejects ({}):\n{out}",
        path.display()
    );
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", all.len())),
        "promtool checked a different number of queries than {}:\n{out}",
        all.len()
    );
}

// ---------------------------------------------------------------------------------------
// A small PromQL reader: enough of the grammar for these dashboards and rules (selectors,
// functions, aggregations with by/without, binary operators with on/ignoring/group_*), and
// which labels each expression's series can carry, so that a label used in a matcher or a
// by/without/on clause can be checked against the metrics it applies to.

mod promql {
    use std::collections::{BTreeMap, BTreeSet};

    #[derive(Debug, Clone, PartialEq)]
    enum Tok {
        Ident(String),
        Num,
        Str(String),
        /// The text between `[` and `]`.
        Range(String),
        Op(String),
        LParen,
        RParen,
        LBrace,
        RBrace,
        Comma,
    }

    #[derive(Debug)]
    pub struct Matcher {
        pub label: String,
        pub op: String,
        pub value: String,
    }

    #[derive(Debug)]
    pub struct Grouping {
        pub without: bool,
        pub labels: Vec<String>,
    }

    #[derive(Debug)]
    pub struct Matching {
        pub on: bool,
        pub labels: Vec<String>,
        /// group_left (true) or group_right, with their extra labels.
        pub group: Option<(bool, Vec<String>)>,
    }

    #[derive(Debug)]
    pub enum Expr {
        Scalar,
        Str(String),
        Selector {
            name: Option<String>,
            matchers: Vec<Matcher>,
            range: Option<String>,
        },
        Call {
            func: String,
            args: Vec<Expr>,
        },
        Agg {
            op: String,
            grouping: Option<Grouping>,
            param: Option<Box<Expr>>,
            arg: Box<Expr>,
        },
        Binary {
            op: String,
            lhs: Box<Expr>,
            rhs: Box<Expr>,
            matching: Option<Matching>,
        },
        /// Parentheses, unary minus, subqueries, offset: the labels of what is inside.
        Wrap(Box<Expr>),
    }

    const AGGREGATIONS: &[&str] = &[
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "limitk",
        "limit_ratio",
    ];
    const WITH_PARAM: &[&str] = &[
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "limitk",
        "limit_ratio",
    ];
    /// Functions whose result carries the labels of their (first) series argument.
    const SAME_LABELS: &[&str] = &[
        "rate",
        "irate",
        "increase",
        "delta",
        "idelta",
        "deriv",
        "resets",
        "changes",
        "avg_over_time",
        "min_over_time",
        "max_over_time",
        "sum_over_time",
        "count_over_time",
        "quantile_over_time",
        "last_over_time",
        "stddev_over_time",
        "present_over_time",
        "abs",
        "ceil",
        "floor",
        "round",
        "sqrt",
        "exp",
        "ln",
        "log2",
        "log10",
        "clamp",
        "clamp_min",
        "clamp_max",
        "sort",
        "sort_desc",
        "timestamp",
        "predict_linear",
    ];

    fn lex(s: &str) -> Result<Vec<Tok>, String> {
        let c: Vec<char> = s.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < c.len() {
            let ch = c[i];
            if ch.is_whitespace() {
                i += 1;
            } else if ch == '#' {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
                let start = i;
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                    i += 1;
                }
                out.push(Tok::Ident(c[start..i].iter().collect()));
            } else if ch.is_ascii_digit()
                || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
            {
                // Numbers, 1e-3, and durations (offset 5m).
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                    let exp = matches!(c[i], 'e' | 'E') && matches!(c.get(i + 1), Some('+' | '-'));
                    i += if exp { 2 } else { 1 };
                }
                out.push(Tok::Num);
            } else if matches!(ch, '"' | '\'' | '`') {
                let mut v = String::new();
                i += 1;
                while i < c.len() && c[i] != ch {
                    if c[i] == '\\' && ch != '`' && i + 1 < c.len() {
                        v.push(c[i]);
                        i += 1;
                    }
                    v.push(c[i]);
                    i += 1;
                }
                if i >= c.len() {
                    return Err("unterminated string".into());
                }
                i += 1;
                out.push(Tok::Str(v));
            } else if ch == '[' {
                let start = i + 1;
                while i < c.len() && c[i] != ']' {
                    i += 1;
                }
                if i >= c.len() {
                    return Err("unterminated [".into());
                }
                out.push(Tok::Range(
                    c[start..i].iter().collect::<String>().trim().to_string(),
                ));
                i += 1;
            } else {
                let two: String = c[i..(i + 2).min(c.len())].iter().collect();
                let tok = match (ch, two.as_str()) {
                    (_, "==" | "!=" | "<=" | ">=" | "=~" | "!~") => {
                        i += 2;
                        Tok::Op(two)
                    }
                    ('(', _) => {
                        i += 1;
                        Tok::LParen
                    }
                    (')', _) => {
                        i += 1;
                        Tok::RParen
                    }
                    ('{', _) => {
                        i += 1;
                        Tok::LBrace
                    }
                    ('}', _) => {
                        i += 1;
                        Tok::RBrace
                    }
                    (',', _) => {
                        i += 1;
                        Tok::Comma
                    }
                    ('=' | '<' | '>' | '+' | '-' | '*' | '/' | '%' | '^' | '@', _) => {
                        i += 1;
                        Tok::Op(ch.to_string())
                    }
                    ('$', _) => return Err("a Grafana variable outside a string or a range".into()),
                    _ => return Err(format!("unexpected {ch:?}")),
                };
                out.push(tok);
            }
        }
        Ok(out)
    }

    struct Parser {
        toks: Vec<Tok>,
        pos: usize,
    }

    fn precedence(t: &Tok) -> Option<(u8, String)> {
        let op = match t {
            Tok::Op(o) if o != "=" && o != "=~" && o != "!~" && o != "@" => o.clone(),
            Tok::Ident(w)
                if ["or", "and", "unless", "atan2"].contains(&w.to_ascii_lowercase().as_str()) =>
            {
                w.to_ascii_lowercase()
            }
            _ => return None,
        };
        let p = match op.as_str() {
            "or" => 1,
            "and" | "unless" => 2,
            "==" | "!=" | "<=" | "<" | ">=" | ">" => 3,
            "+" | "-" => 4,
            "*" | "/" | "%" | "atan2" => 5,
            "^" => 6,
            _ => return None,
        };
        Some((p, op))
    }

    impl Parser {
        fn peek(&self) -> Option<&Tok> {
            self.toks.get(self.pos)
        }
        fn next(&mut self) -> Result<Tok, String> {
            let t = self.toks.get(self.pos).cloned().ok_or("unexpected end")?;
            self.pos += 1;
            Ok(t)
        }
        fn expect(&mut self, want: Tok) -> Result<(), String> {
            let got = self.next()?;
            if got == want {
                Ok(())
            } else {
                Err(format!("expected {want:?}, found {got:?}"))
            }
        }
        fn ident_is(&self, words: &[&str]) -> Option<String> {
            match self.peek() {
                Some(Tok::Ident(w)) if words.contains(&w.to_ascii_lowercase().as_str()) => {
                    Some(w.to_ascii_lowercase())
                }
                _ => None,
            }
        }

        fn label_list(&mut self) -> Result<Vec<String>, String> {
            self.expect(Tok::LParen)?;
            let mut out = Vec::new();
            loop {
                match self.next()? {
                    Tok::RParen => return Ok(out),
                    Tok::Ident(l) => out.push(l),
                    Tok::Comma => {}
                    t => return Err(format!("in a label list: {t:?}")),
                }
            }
        }

        fn expr(&mut self, min: u8) -> Result<Expr, String> {
            let mut lhs = self.unary()?;
            while let Some((p, op)) = self.peek().and_then(precedence) {
                if p < min {
                    break;
                }
                self.pos += 1;
                if self.ident_is(&["bool"]).is_some() {
                    self.pos += 1;
                }
                let mut matching = None;
                if let Some(w) = self.ident_is(&["on", "ignoring"]) {
                    self.pos += 1;
                    let labels = self.label_list()?;
                    let mut group = None;
                    if let Some(g) = self.ident_is(&["group_left", "group_right"]) {
                        self.pos += 1;
                        let extra = if self.peek() == Some(&Tok::LParen) {
                            self.label_list()?
                        } else {
                            Vec::new()
                        };
                        group = Some((g == "group_left", extra));
                    }
                    matching = Some(Matching {
                        on: w == "on",
                        labels,
                        group,
                    });
                }
                // ^ is right-associative, the rest left.
                let rhs = self.expr(if op == "^" { p } else { p + 1 })?;
                lhs = Expr::Binary {
                    op,
                    lhs: Box::new(lhs),
                    rhs: Box::new(rhs),
                    matching,
                };
            }
            Ok(lhs)
        }

        fn unary(&mut self) -> Result<Expr, String> {
            if matches!(self.peek(), Some(Tok::Op(o)) if o == "-" || o == "+") {
                self.pos += 1;
                return Ok(Expr::Wrap(Box::new(self.unary()?)));
            }
            let mut e = self.primary()?;
            loop {
                match self.peek() {
                    Some(Tok::Range(r)) => {
                        let r = r.clone();
                        self.pos += 1;
                        e = match e {
                            Expr::Selector {
                                name,
                                matchers,
                                range: None,
                            } => Expr::Selector {
                                name,
                                matchers,
                                range: Some(r),
                            },
                            other => Expr::Wrap(Box::new(other)), // a subquery
                        };
                    }
                    Some(Tok::Ident(w)) if w == "offset" => {
                        self.pos += 1;
                        if matches!(self.peek(), Some(Tok::Op(o)) if o == "-") {
                            self.pos += 1;
                        }
                        self.next()?;
                    }
                    Some(Tok::Op(o)) if o == "@" => {
                        self.pos += 1;
                        self.next()?;
                        if self.peek() == Some(&Tok::LParen) {
                            self.next()?;
                            self.expect(Tok::RParen)?;
                        }
                    }
                    _ => return Ok(e),
                }
            }
        }

        fn matchers(&mut self) -> Result<Vec<Matcher>, String> {
            self.expect(Tok::LBrace)?;
            let mut out = Vec::new();
            loop {
                match self.next()? {
                    Tok::RBrace => return Ok(out),
                    Tok::Comma => {}
                    Tok::Ident(label) => {
                        let op = match self.next()? {
                            Tok::Op(o) if ["=", "!=", "=~", "!~"].contains(&o.as_str()) => o,
                            t => return Err(format!("matcher {label}: operator {t:?}")),
                        };
                        let value = match self.next()? {
                            Tok::Str(v) => v,
                            t => return Err(format!("matcher {label}: value {t:?}")),
                        };
                        out.push(Matcher { label, op, value });
                    }
                    t => return Err(format!("in a selector: {t:?}")),
                }
            }
        }

        fn args(&mut self) -> Result<Vec<Expr>, String> {
            self.expect(Tok::LParen)?;
            let mut out = Vec::new();
            if self.peek() == Some(&Tok::RParen) {
                self.pos += 1;
                return Ok(out);
            }
            loop {
                out.push(self.expr(0)?);
                match self.next()? {
                    Tok::Comma => {}
                    Tok::RParen => return Ok(out),
                    t => return Err(format!("in arguments: {t:?}")),
                }
            }
        }

        fn primary(&mut self) -> Result<Expr, String> {
            match self.next()? {
                Tok::Num => Ok(Expr::Scalar),
                Tok::Str(s) => Ok(Expr::Str(s)),
                Tok::LParen => {
                    let e = self.expr(0)?;
                    self.expect(Tok::RParen)?;
                    Ok(Expr::Wrap(Box::new(e)))
                }
                Tok::LBrace => {
                    self.pos -= 1;
                    Ok(Expr::Selector {
                        name: None,
                        matchers: self.matchers()?,
                        range: None,
                    })
                }
                Tok::Ident(w) => {
                    let lower = w.to_ascii_lowercase();
                    if AGGREGATIONS.contains(&lower.as_str()) {
                        let mut grouping = self.grouping()?;
                        let mut args = self.args()?;
                        if grouping.is_none() {
                            grouping = self.grouping()?;
                        }
                        let want = if WITH_PARAM.contains(&lower.as_str()) {
                            2
                        } else {
                            1
                        };
                        if args.len() != want {
                            return Err(format!("{w}: {} arguments, expected {want}", args.len()));
                        }
                        let arg = Box::new(args.pop().unwrap());
                        let param = args.pop().map(Box::new);
                        Ok(Expr::Agg {
                            op: lower,
                            grouping,
                            param,
                            arg,
                        })
                    } else if self.peek() == Some(&Tok::LParen) {
                        Ok(Expr::Call {
                            func: w,
                            args: self.args()?,
                        })
                    } else if [
                        "by",
                        "without",
                        "on",
                        "ignoring",
                        "bool",
                        "offset",
                        "group_left",
                        "group_right",
                    ]
                    .contains(&lower.as_str())
                    {
                        Err(format!("keyword {w} out of place"))
                    } else {
                        let matchers = if self.peek() == Some(&Tok::LBrace) {
                            self.matchers()?
                        } else {
                            Vec::new()
                        };
                        Ok(Expr::Selector {
                            name: Some(w),
                            matchers,
                            range: None,
                        })
                    }
                }
                t => Err(format!("unexpected {t:?}")),
            }
        }

        fn grouping(&mut self) -> Result<Option<Grouping>, String> {
            match self.ident_is(&["by", "without"]) {
                Some(w) => {
                    self.pos += 1;
                    Ok(Some(Grouping {
                        without: w == "without",
                        labels: self.label_list()?,
                    }))
                }
                None => Ok(None),
            }
        }
    }

    pub fn parse(s: &str) -> Result<Expr, String> {
        let mut p = Parser {
            toks: lex(s)?,
            pos: 0,
        };
        let e = p.expr(0)?;
        match p.peek() {
            None => Ok(e),
            Some(t) => Err(format!("unexpected {t:?} after the expression")),
        }
    }

    /// Calls `f` on `e` and everything inside it.
    pub fn visit(e: &Expr, f: &mut dyn FnMut(&Expr)) {
        f(e);
        match e {
            Expr::Call { args, .. } => args.iter().for_each(|a| visit(a, f)),
            Expr::Agg { param, arg, .. } => {
                if let Some(p) = param {
                    visit(p, f);
                }
                visit(arg, f);
            }
            Expr::Binary { lhs, rhs, .. } => {
                visit(lhs, f);
                visit(rhs, f);
            }
            Expr::Wrap(inner) => visit(inner, f),
            Expr::Scalar | Expr::Str(_) | Expr::Selector { .. } => {}
        }
    }

    fn unwrap(e: &Expr) -> &Expr {
        match e {
            Expr::Wrap(inner) => unwrap(inner),
            e => e,
        }
    }

    /// `sum by (le, ...) (<func>(<metric>_bucket{...}[$__rate_interval]))`.
    pub fn is_sum_by_le_of(e: &Expr, func: &str) -> bool {
        let Expr::Agg {
            op,
            grouping: Some(g),
            arg,
            ..
        } = unwrap(e)
        else {
            return false;
        };
        let Expr::Call { func: f, args } = unwrap(arg) else {
            return false;
        };
        let Some(Expr::Selector {
            name: Some(name),
            range: Some(range),
            ..
        }) = args.first().map(unwrap)
        else {
            return false;
        };
        op == "sum"
            && !g.without
            && g.labels.iter().any(|l| l == "le")
            && f == func
            && name.ends_with("_bucket")
            && range == "$__rate_interval"
    }

    fn metrics_in(e: &Expr) -> Vec<String> {
        let mut out = Vec::new();
        visit(e, &mut |e| {
            if let Expr::Selector { name: Some(n), .. } = e {
                out.push(n.clone());
            }
        });
        out
    }

    /// The labels the series of `e` can carry, given those of every series name (`known`);
    /// None for a scalar or string. Every label named in a matcher, a by/without/on/ignoring
    /// or group_* list that the series it applies to cannot carry, and every unknown series
    /// or function, is added to `problems`.
    pub fn labels(
        e: &Expr,
        known: &BTreeMap<String, BTreeSet<String>>,
        ctx: &str,
        problems: &mut Vec<String>,
    ) -> Option<BTreeSet<String>> {
        let check = |problems: &mut Vec<String>,
                     labels: &[String],
                     have: &BTreeSet<String>,
                     clause: &str,
                     of: &Expr| {
            for l in labels {
                if !have.contains(l) {
                    problems.push(format!(
                        "{ctx}: {clause}: {l} is not a label of {:?}",
                        metrics_in(of)
                    ));
                }
            }
        };
        match e {
            Expr::Scalar | Expr::Str(_) => None,
            Expr::Wrap(inner) => labels(inner, known, ctx, problems),
            Expr::Selector { name, matchers, .. } => {
                let Some(name) = name else {
                    problems.push(format!("{ctx}: a selector without a metric name"));
                    return Some(BTreeSet::new());
                };
                let Some(have) = known.get(name) else {
                    problems.push(format!(
                        "{ctx}: {name} is not exported (docs/metrics.md) nor recorded"
                    ));
                    return Some(BTreeSet::new());
                };
                let used: Vec<String> = matchers
                    .iter()
                    .map(|m| m.label.clone())
                    .filter(|l| l != "__name__")
                    .collect();
                check(problems, &used, have, &format!("selector of {name}"), e);
                Some(have.clone())
            }
            Expr::Call { func, args } => {
                let arg_labels: Vec<Option<BTreeSet<String>>> = args
                    .iter()
                    .map(|a| labels(a, known, ctx, problems))
                    .collect();
                let first = || {
                    arg_labels
                        .iter()
                        .flatten()
                        .next()
                        .cloned()
                        .unwrap_or_default()
                };
                match func.as_str() {
                    f if SAME_LABELS.contains(&f) => Some(first()),
                    "histogram_quantile" => {
                        let mut l = arg_labels.get(1).cloned().flatten().unwrap_or_default();
                        if !l.remove("le") {
                            problems
                                .push(format!("{ctx}: histogram_quantile over series without le"));
                        }
                        Some(l)
                    }
                    "label_replace" => {
                        let mut l = first();
                        if let (Some(Expr::Str(dst)), Some(Expr::Str(src))) =
                            (args.get(1), args.get(3))
                        {
                            if !src.is_empty() {
                                check(
                                    problems,
                                    std::slice::from_ref(src),
                                    &l,
                                    "label_replace source",
                                    &args[0],
                                );
                            }
                            l.insert(dst.clone());
                        }
                        Some(l)
                    }
                    "vector" | "absent" | "absent_over_time" => Some(BTreeSet::new()),
                    "scalar" | "time" => None,
                    f => {
                        problems.push(format!(
                            "{ctx}: function {f} unknown to this test's PromQL reader"
                        ));
                        Some(first())
                    }
                }
            }
            Expr::Agg {
                op,
                grouping,
                param,
                arg,
            } => {
                if let Some(p) = param {
                    labels(p, known, ctx, problems);
                }
                let have = labels(arg, known, ctx, problems).unwrap_or_default();
                let keeps_labels =
                    ["topk", "bottomk", "limitk", "limit_ratio"].contains(&op.as_str());
                let out = match grouping {
                    Some(g) => {
                        check(
                            problems,
                            &g.labels,
                            &have,
                            &format!("{op} {}", if g.without { "without" } else { "by" }),
                            arg,
                        );
                        if keeps_labels {
                            have
                        } else if g.without {
                            have.iter()
                                .filter(|l| !g.labels.contains(l))
                                .cloned()
                                .collect()
                        } else {
                            g.labels.iter().cloned().collect()
                        }
                    }
                    None if keeps_labels => have,
                    None => BTreeSet::new(),
                };
                Some(out)
            }
            Expr::Binary {
                op,
                lhs,
                rhs,
                matching,
            } => {
                let l = labels(lhs, known, ctx, problems);
                let r = labels(rhs, known, ctx, problems);
                let (l, r) = match (l, r) {
                    (Some(l), Some(r)) => (l, r),
                    (l, r) => return l.or(r),
                };
                let Some(m) = matching else {
                    return Some(if op == "or" {
                        l.union(&r).cloned().collect()
                    } else {
                        l
                    });
                };
                let clause = if m.on { "on" } else { "ignoring" };
                check(
                    problems,
                    &m.labels,
                    &l,
                    &format!("{op} {clause} (left side)"),
                    lhs,
                );
                check(
                    problems,
                    &m.labels,
                    &r,
                    &format!("{op} {clause} (right side)"),
                    rhs,
                );
                Some(match (op.as_str(), &m.group) {
                    ("and" | "unless", _) => l,
                    ("or", _) => l.union(&r).cloned().collect(),
                    (_, Some((true, extra))) => {
                        check(problems, extra, &r, "group_left", rhs);
                        l.iter().chain(extra).cloned().collect()
                    }
                    (_, Some((false, extra))) => {
                        check(problems, extra, &l, "group_right", lhs);
                        r.iter().chain(extra).cloned().collect()
                    }
                    // One-to-one: on() keeps only the matching labels, ignoring() drops them.
                    _ if m.on => m
                        .labels
                        .iter()
                        .filter(|x| l.contains(*x))
                        .cloned()
                        .collect(),
                    _ => l
                        .iter()
                        .filter(|x| !m.labels.contains(x))
                        .cloned()
                        .collect(),
                })
            }
        }
    }
}

#[test]
fn promql_reader_knows_which_labels_apply_where() {
    let known: BTreeMap<String, BTreeSet<String>> = [
        ("a_bucket", &["comm", "pod", "le", "instance"][..]),
        ("b_total", &["comm", "reason", "instance"][..]),
        ("info", &["instance", "job", "version"][..]),
    ]
    .into_iter()
    .map(|(n, l)| (n.to_string(), l.iter().map(|l| l.to_string()).collect()))
    .collect();
    let check = |expr: &str| {
        let mut problems = Vec::new();
        let e = promql::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        let labels = promql::labels(&e, &known, "t", &mut problems);
        (
            labels.map(|l| l.into_iter().collect::<Vec<_>>().join(",")),
            problems,
        )
    };
    let ok = |expr: &str, want: &str| {
        let (got, problems) = check(expr);
        assert!(problems.is_empty(), "{expr}: {problems:?}");
        assert_eq!(got.as_deref(), Some(want), "{expr}");
    };
    let bad = |expr: &str, needle: &str| {
        let (_, problems) = check(expr);
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "{expr}: expected a problem about {needle}, got {problems:?}"
        );
    };
    ok(
        r#"histogram_quantile(0.99, sum by (le, pod) (rate(a_bucket{comm=~"$comm", pod!="x{y}"}[$__rate_interval])))"#,
        "pod",
    );
    ok(
        "topk(3, sum without (reason) (rate(b_total[5m])))",
        "comm,instance",
    );
    ok("sum by (comm) (rate(b_total[1m])) / on (comm) group_left (pod) sum by (comm, pod) (a_bucket)", "comm,pod");
    ok(
        "(a_bucket + on (comm) b_total) or b_total",
        "comm,instance,reason",
    );
    ok("b_total and on (instance) info", "comm,instance,reason");
    ok(
        "sum(rate(b_total[5m] offset 1h)) > bool 2 ^ -1 # a comment",
        "",
    );
    bad(r#"sum by (version) (rate(b_total[1m]))"#, "by: version");
    bad(r#"b_total{le="1"}"#, "selector of b_total: le");
    bad(
        "histogram_quantile(0.9, sum by (comm) (rate(a_bucket[1m])))",
        "without le",
    );
    bad("b_total and on (job) info", "left side");
    bad("c_total", "c_total is not exported");
    bad(
        "sum by (pod) (b_total + ignoring (reason) a_bucket)",
        "by: pod",
    );
    assert!(promql::parse("rate(a_bucket[5m]").is_err());
    assert!(promql::parse("topk($n, b_total)").is_err());
    assert!(promql::parse("sum by (le) (b_total) extra").is_err());
}

/// The previews (`cargo xtask dashboards-preview`) match the dashboards: every panel with
/// queries has its image, every image its panel, and dashboards/README.md shows each one.
#[test]
fn every_panel_has_a_preview_image_and_every_image_a_panel() {
    let readme = read("dashboards/README.md");
    let mut problems = Vec::new();
    let mut want = BTreeSet::new();
    for d in dashboards() {
        let uid = d.json["uid"].as_str().unwrap_or("").to_string();
        for (_, p) in panels(&d.json) {
            if p["type"] == "row" || targets(p).is_empty() {
                continue;
            }
            let rel = format!("docs/dashboards/{uid}/{}.png", p["id"]);
            if !workspace_root().join(&rel).exists() {
                problems.push(format!("{}: {} has no image {rel}", d.file, title(p)));
            }
            if !readme.contains(&format!("(../{rel})")) {
                problems.push(format!("dashboards/README.md does not show {rel}"));
            }
            want.insert(rel);
        }
    }
    let dir = workspace_root().join("docs/dashboards");
    for uid_dir in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(uid_dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let rel = format!(
                "docs/dashboards/{}/{}",
                uid_dir.file_name().to_string_lossy(),
                f.file_name().to_string_lossy()
            );
            if !want.contains(&rel) {
                problems.push(format!("{rel} belongs to no panel"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "previews out of date (run `cargo xtask dashboards-preview` as root):\n{}",
        problems.join("\n")
    );
}
