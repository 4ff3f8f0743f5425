//! deploy/: the kustomize base validates against the Kubernetes and prometheus-operator
//! schemas, keeps the DaemonSet's security posture, and its alerting rules pass promtool, agree
//! with deploy/alerts/stallwatch.rules.yaml and name only metrics the agent exports.
//!
//! No root needed. Tools come from `cargo xtask setup`: promtool (Debian's prometheus) and a
//! venv at target/toolchains/deploy-venv with kubernetes-validate and the prometheus-operator
//! models (PyYAML parses every YAML file here, for the Rust checks too). A missing tool skips
//! with a message, and fails under STALLWATCH_REQUIRE_KERNEL=1 (CI), where nothing may skip.
//!
//! After editing the rules: STALLWATCH_UPDATE_DEPLOY=1 cargo test -p stallwatch --test
//! deploy_manifests rewrites deploy/kustomize/base/prometheusrule.yaml from them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{promtool, run_promtool, tool_or_skip, workspace_root};
use serde_json::Value;

const BASE: &str = "deploy/kustomize/base";
const RULES: &str = "deploy/alerts/stallwatch.rules.yaml";
const RULES_TEST: &str = "deploy/alerts/tests/stallwatch.rules.test.yaml";
const PROMETHEUS_RULE: &str = "deploy/kustomize/base/prometheusrule.yaml";
/// The oldest Kubernetes the base claims (deploy/README.md) and the newest the pinned
/// kubernetes-validate ships.
const KUBERNETES_VERSIONS: &[&str] = &["1.30", "1.37"];
/// Exactly what the DaemonSet adds after dropping ALL (deploy/README.md says why each).
const CAPABILITIES: &[&str] = &[
    "BPF",
    "PERFMON",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
    "SYS_ADMIN",
];

/// Run by the venv's python as `-c HELPER <command> <args>`:
/// `json FILE...` prints `{file: [documents]}`; `validate VERSIONS FILE...` validates every
/// document (VERSIONS comma-separated) and exits 1 naming each failure.
const HELPER: &str = r#"
import copy, json, sys
import jsonschema, yaml

def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]

def strict(s):
    # kubectl --validate=strict semantics for a CRD schema: a field it does not name is an
    # error. Objects with named properties get additionalProperties: false. Go's RE2 takes
    # flags anywhere (^(?i)...), Python's re only at the start.
    if isinstance(s, dict):
        if isinstance(s.get("pattern"), str) and "(?i)" in s["pattern"]:
            s["pattern"] = "(?i)" + s["pattern"].replace("(?i)", "")
        props = s.get("properties")
        if isinstance(props, dict):
            for v in props.values():
                strict(v)
            if props and "additionalProperties" not in s:
                s["additionalProperties"] = False
        for key in ("items", "additionalProperties"):
            if isinstance(s.get(key), dict):
                strict(s[key])
        for key in ("anyOf", "oneOf", "allOf"):
            for v in s.get(key, []):
                strict(v)
        for v in s.get("$defs", {}).values():
            strict(v)
    return s

def crd_validators():
    # Models generated from the prometheus-operator CRDs (openAPIV3Schema), as JSON Schema.
    from cloudcoil.models.prometheus_operator import v1
    out = {}
    for kind in ("ServiceMonitor", "PrometheusRule"):
        schema = strict(getattr(v1, kind).model_json_schema(by_alias=True))
        jsonschema.Draft202012Validator.check_schema(schema)
        out[("monitoring.coreos.com/v1", kind)] = jsonschema.Draft202012Validator(schema)
    return out

def validate(doc, version, crds):
    import kubernetes_validate
    v = crds.get((doc.get("apiVersion"), doc.get("kind")))
    if v is not None:
        # best_match looks inside anyOf (every optional field is "this or null") for the
        # error that names the field.
        e = jsonschema.exceptions.best_match(v.iter_errors(doc))
        if e is not None:
            return "%s: %s" % (".".join(str(p) for p in e.absolute_path), e.message[:300])
        return None
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return "%s: %s" % (".".join(str(p) for p in e.absolute_path), e.message)
    except kubernetes_validate.SchemaNotFoundError as e:
        return e.message
    return None

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "json":
    json.dump({p: docs(p) for p in args}, sys.stdout)
elif cmd == "validate":
    versions, files = args[0].split(","), args[1:]
    crds = crd_validators()
    failed = False
    for path in files:
        for doc in docs(path):
            what = "%s %s/%s" % (path, doc.get("kind"), doc.get("metadata", {}).get("name"))
            crd = (doc.get("apiVersion"), doc.get("kind")) in crds
            for version in versions[:1] if crd else versions:
                against = "prometheus-operator CRD" if crd else "Kubernetes " + version
                err = validate(doc, version, crds)
                print(("FAIL %s (%s): %s" % (what, against, err)) if err
                      else "ok   %s (%s)" % (what, against))
                failed |= err is not None
                # The validator must be strict, or the line above proves nothing.
                bad = copy.deepcopy(doc)
                (bad["spec"] if isinstance(bad.get("spec"), dict) else bad)["unknownField"] = 1
                if validate(bad, version, crds) is None:
                    print("FAIL %s (%s): the validator accepts an unknown field" % (what, against))
                    failed = True
    sys.exit(1 if failed else 0)
else:
    sys.exit("unknown command " + cmd)
"#;

fn python(test: &str) -> Option<PathBuf> {
    let py = workspace_root().join("target/toolchains/deploy-venv/bin/python3");
    tool_or_skip(
        test,
        &format!("python venv ({})", py.display()),
        "cargo xtask setup",
        py.exists().then_some(py),
    )
}

/// Runs the helper: whether it succeeded, and everything it printed.
fn run_helper(py: &Path, args: &[String]) -> (bool, String) {
    let out = Command::new(py)
        .current_dir(workspace_root())
        .arg("-c")
        .arg(HELPER)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", py.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.success(), format!("{stdout}{stderr}"))
}

/// Every YAML document of `files` (workspace-relative), parsed by PyYAML, by file.
fn yaml_docs(py: &Path, files: &[String]) -> BTreeMap<String, Vec<Value>> {
    let mut args = vec!["json".to_string()];
    args.extend(files.iter().cloned());
    let (ok, out) = run_helper(py, &args);
    assert!(ok, "parsing {files:?}:\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("helper output is not JSON ({e}):\n{out}"))
}

fn yaml_doc(py: &Path, file: &str) -> Value {
    let mut docs = yaml_docs(py, &[file.to_string()])
        .remove(file)
        .unwrap_or_default();
    assert_eq!(docs.len(), 1, "{file}: expected one YAML document");
    docs.remove(0)
}

/// The YAML files of the base, kustomization.yaml excluded, workspace-relative and sorted.
fn base_manifests() -> Vec<String> {
    let dir = workspace_root().join(BASE);
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| (n.ends_with(".yaml") || n.ends_with(".yml")) && n != "kustomization.yaml")
        .map(|n| format!("{BASE}/{n}"))
        .collect();
    files.sort();
    files
}

/// The base's objects by kind (each kind once).
fn base_objects(py: &Path) -> BTreeMap<String, Value> {
    let mut objects = BTreeMap::new();
    for (file, docs) in yaml_docs(py, &base_manifests()) {
        for doc in docs {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: a document without kind"))
                .to_string();
            assert!(
                objects.insert(kind.clone(), doc).is_none(),
                "{kind} defined twice"
            );
        }
    }
    objects
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The first path where `a` and `b` differ, for a readable failure.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(p), Some(q)) => first_difference(p, q, &format!("{path}.{k}")),
                (p, q) => Some(format!("{path}.{k}: {p:?} vs {q:?}")),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} vs {b}")),
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let Some(py) = python("kustomization_lists_every_manifest") else {
        return;
    };
    let kustomization = yaml_doc(&py, &format!("{BASE}/kustomization.yaml"));
    let listed: BTreeSet<String> = strs(&kustomization["resources"])
        .into_iter()
        .map(|r| format!("{BASE}/{r}"))
        .collect();
    let present: BTreeSet<String> = base_manifests().into_iter().collect();
    let unlisted: Vec<_> = present.difference(&listed).collect();
    let missing: Vec<_> = listed.difference(&present).collect();
    assert!(
        unlisted.is_empty(),
        "not in {BASE}/kustomization.yaml resources: {unlisted:?}"
    );
    assert!(
        missing.is_empty(),
        "listed in {BASE}/kustomization.yaml but absent: {missing:?}"
    );

    // The images: entry is the one that overrides the DaemonSet's image.
    let objects = base_objects(&py);
    let image = objects["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .expect("DaemonSet image");
    let names: Vec<&str> = kustomization["images"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["name"].as_str()).collect())
        .unwrap_or_default();
    let repo = image.rsplit_once(':').map_or(image, |(r, _)| r);
    assert!(
        names.contains(&repo),
        "kustomization images {names:?} do not name the DaemonSet's image {image}"
    );
}

#[test]
fn manifests_validate_against_kubernetes_and_operator_schemas() {
    let Some(py) = python("manifests_validate_against_kubernetes_and_operator_schemas") else {
        return;
    };
    let mut args = vec!["validate".to_string(), KUBERNETES_VERSIONS.join(",")];
    args.extend(base_manifests());
    let (ok, out) = run_helper(&py, &args);
    assert!(ok, "schema validation failed:\n{out}");
    for kind in ["DaemonSet", "ServiceMonitor", "PrometheusRule"] {
        assert!(
            out.contains(&format!(" {kind}/")),
            "{kind} was not validated:\n{out}"
        );
    }
    eprint!("{out}");
}

#[test]
fn rules_pass_promtool_check() {
    let Some(promtool) = promtool("rules_pass_promtool_check") else {
        return;
    };
    let (ok, out) = run_promtool(&promtool, &["check", "rules", RULES]);
    assert!(ok, "promtool check rules {RULES}:\n{out}");
}

#[test]
fn rules_unit_tests_pass() {
    let Some(promtool) = promtool("rules_unit_tests_pass") else {
        return;
    };
    let (ok, out) = run_promtool(&promtool, &["test", "rules", RULES_TEST]);
    assert!(ok, "promtool test rules {RULES_TEST}:\n{out}");
}

/// The PrometheusRule's text: its head through `spec:`, then the rules file (less its leading
/// comments) indented under it.
fn prometheus_rule_from(rules: &str, current: &str) -> String {
    let head = current
        .find("\nspec:\n")
        .map(|i| &current[..i + "\nspec:\n".len()])
        .unwrap_or_else(|| panic!("{PROMETHEUS_RULE}: no top-level `spec:` line"));
    let mut out = head.to_string();
    let body = rules
        .lines()
        .skip_while(|l| l.trim().is_empty() || l.starts_with('#'));
    for line in body {
        if !line.is_empty() {
            out.push_str("  ");
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[test]
fn prometheus_rule_spec_is_the_rules_file() {
    let Some(py) = python("prometheus_rule_spec_is_the_rules_file") else {
        return;
    };
    let root = workspace_root();
    if std::env::var("STALLWATCH_UPDATE_DEPLOY").as_deref() == Ok("1") {
        let rules = std::fs::read_to_string(root.join(RULES)).unwrap();
        let current = std::fs::read_to_string(root.join(PROMETHEUS_RULE)).unwrap();
        std::fs::write(
            root.join(PROMETHEUS_RULE),
            prometheus_rule_from(&rules, &current),
        )
        .unwrap();
    }
    let rules = yaml_doc(&py, RULES);
    let object = yaml_doc(&py, PROMETHEUS_RULE);
    assert_eq!(object["kind"], "PrometheusRule");
    if let Some(diff) = first_difference(&object["spec"], &rules, "spec") {
        panic!(
            "{PROMETHEUS_RULE} spec differs from {RULES} at {diff}\n\
             regenerate it: STALLWATCH_UPDATE_DEPLOY=1 cargo test -p stallwatch --test deploy_manifests"
        );
    }
}

#[test]
fn daemonset_keeps_its_security_posture() {
    let Some(py) = python("daemonset_keeps_its_security_posture") else {
        return;
    };
    let objects = base_objects(&py);
    let pod = &objects["DaemonSet"]["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostPID"], true,
        "hostPID: the agent reads every process's /proc"
    );
    assert!(
        pod["hostNetwork"].is_null() || pod["hostNetwork"] == false,
        "hostNetwork must stay off: {}",
        pod["hostNetwork"]
    );
    assert!(
        pod["hostIPC"].is_null() || pod["hostIPC"] == false,
        "hostIPC must stay off"
    );
    assert!(
        pod["securityContext"]["privileged"].is_null(),
        "privileged is a container field; the pod must not carry it"
    );

    let containers = pod["containers"].as_array().expect("containers");
    let init = pod["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        init.is_empty(),
        "an init container would need its own review: {init:?}"
    );
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .map(|v| v.iter().map(|v| (v["name"].as_str().unwrap(), v)).collect())
        .unwrap_or_default();
    for c in containers {
        let name = c["name"].as_str().unwrap_or("?");
        let sc = &c["securityContext"];
        assert_eq!(
            sc["privileged"], false,
            "{name}: privileged must be explicitly false"
        );
        assert_eq!(
            sc["allowPrivilegeEscalation"], false,
            "{name}: allowPrivilegeEscalation"
        );
        assert_eq!(
            sc["readOnlyRootFilesystem"], true,
            "{name}: readOnlyRootFilesystem"
        );
        assert_eq!(
            sc["seccompProfile"]["type"], "RuntimeDefault",
            "{name}: seccompProfile"
        );
        assert_eq!(
            strs(&sc["capabilities"]["drop"]),
            ["ALL"],
            "{name}: capabilities.drop"
        );
        let added: BTreeSet<&str> = strs(&sc["capabilities"]["add"]).into_iter().collect();
        let want: BTreeSet<&str> = CAPABILITIES.iter().copied().collect();
        assert_eq!(added, want, "{name}: capabilities.add");
        assert!(
            !added.contains("NET_ADMIN") && !added.contains("SYS_MODULE"),
            "{name}: no NET_ADMIN / SYS_MODULE"
        );

        let mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
        for m in &mounts {
            let vol = m["name"].as_str().unwrap();
            let v = volumes
                .get(vol)
                .unwrap_or_else(|| panic!("{name}: mount of unknown volume {vol}"));
            if !v["hostPath"].is_null() {
                assert_eq!(
                    m["readOnly"], true,
                    "{name}: hostPath {} mounted at {} must be readOnly",
                    v["hostPath"]["path"], m["mountPath"]
                );
            }
        }
        let host_paths: BTreeMap<&str, &str> = mounts
            .iter()
            .filter_map(|m| {
                let v = volumes[m["name"].as_str().unwrap()];
                Some((v["hostPath"]["path"].as_str()?, m["mountPath"].as_str()?))
            })
            .collect();
        assert_eq!(
            host_paths,
            BTreeMap::from([
                ("/sys/fs/cgroup", "/host/sys/fs/cgroup"),
                ("/sys/kernel/btf", "/sys/kernel/btf")
            ]),
            "{name}: host paths mounted"
        );
    }
    // Every hostPath volume is mounted (and so checked above).
    for (vol, v) in &volumes {
        if !v["hostPath"].is_null() {
            let mounted = containers.iter().any(|c| {
                c["volumeMounts"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["name"] == *vol))
            });
            assert!(
                mounted,
                "hostPath volume {vol} is not mounted by any container"
            );
        }
    }
}

#[test]
fn cluster_role_reads_pods_only() {
    let Some(py) = python("cluster_role_reads_pods_only") else {
        return;
    };
    let objects = base_objects(&py);
    let rules = objects["ClusterRole"]["rules"]
        .as_array()
        .expect("ClusterRole rules");
    assert_eq!(rules.len(), 1, "one rule: {rules:?}");
    let rule = &rules[0];
    assert_eq!(strs(&rule["apiGroups"]), [""], "core API group only");
    assert_eq!(strs(&rule["resources"]), ["pods"], "pods only");
    let verbs: BTreeSet<&str> = strs(&rule["verbs"]).into_iter().collect();
    assert_eq!(
        verbs,
        BTreeSet::from(["get", "list", "watch"]),
        "read-only verbs"
    );
    assert!(rule["resourceNames"].is_null() && rule["nonResourceURLs"].is_null());

    let binding = &objects["ClusterRoleBinding"];
    let sa = &objects["ServiceAccount"];
    let ds = &objects["DaemonSet"];
    assert_eq!(
        binding["roleRef"]["name"],
        objects["ClusterRole"]["metadata"]["name"]
    );
    let subjects = binding["subjects"]
        .as_array()
        .expect("ClusterRoleBinding subjects");
    assert_eq!(subjects.len(), 1, "one subject: {subjects:?}");
    assert_eq!(subjects[0]["kind"], "ServiceAccount");
    assert_eq!(subjects[0]["name"], sa["metadata"]["name"]);
    assert_eq!(subjects[0]["namespace"], sa["metadata"]["namespace"]);
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        sa["metadata"]["name"]
    );
    assert_eq!(ds["metadata"]["namespace"], sa["metadata"]["namespace"]);
}

#[test]
fn service_monitor_scrapes_the_agent_port() {
    let Some(py) = python("service_monitor_scrapes_the_agent_port") else {
        return;
    };
    let objects = base_objects(&py);
    let ds = &objects["DaemonSet"];
    let svc = &objects["Service"];
    let sm = &objects["ServiceMonitor"];
    let template_labels = ds["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    let subset = |sel: &Value, of: &serde_json::Map<String, Value>| {
        sel.as_object()
            .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| of.get(k) == Some(v)))
    };
    assert!(
        subset(&ds["spec"]["selector"]["matchLabels"], template_labels),
        "DaemonSet selector vs its pods"
    );
    assert!(
        subset(&svc["spec"]["selector"], template_labels),
        "Service selector vs the agent pods"
    );
    assert!(
        subset(
            &sm["spec"]["selector"]["matchLabels"],
            svc["metadata"]["labels"].as_object().unwrap()
        ),
        "ServiceMonitor selector vs the Service's labels"
    );
    assert_eq!(
        sm["metadata"]["namespace"], svc["metadata"]["namespace"],
        "ServiceMonitor watches its own namespace"
    );

    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let port = container["ports"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "metrics"))
        .expect("container port named metrics");
    assert_eq!(port["containerPort"], 9477);
    let listen = container["env"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "STALLWATCH_LISTEN"))
        .and_then(|e| e["value"].as_str())
        .expect("STALLWATCH_LISTEN");
    assert!(
        listen.ends_with(":9477"),
        "STALLWATCH_LISTEN={listen} vs containerPort 9477"
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "metrics");

    let svc_port = &svc["spec"]["ports"][0];
    assert_eq!(
        (svc_port["name"].as_str(), svc_port["port"].as_u64()),
        (Some("metrics"), Some(9477))
    );
    assert_eq!(svc_port["targetPort"], "metrics");
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(endpoint["interval"], "15s");
    // The series' namespace/pod/container are the observed workload's: the agent pod's own
    // target labels must be dropped, not merged in (see the comment in servicemonitor.yaml).
    let dropped: BTreeSet<&str> = endpoint["relabelings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| {
            r["action"]
                .as_str()
                .is_some_and(|a| a.eq_ignore_ascii_case("labeldrop"))
        })
        .flat_map(|r| r["regex"].as_str().unwrap_or("").split('|'))
        .collect();
    for label in ["namespace", "pod", "container"] {
        assert!(
            dropped.contains(label),
            "ServiceMonitor must labeldrop the target's {label}: {dropped:?}"
        );
    }
    assert!(
        endpoint["honorLabels"] != true,
        "honorLabels would pin the agent pod's labels on host processes"
    );
}

/// What a PromQL expression selects by: metric names (identifiers that are not functions,
/// aggregation operators or keywords) and label names (in matchers and grouping lists).
/// Strings, ranges, numbers and durations are skipped.
#[derive(Debug, Default)]
struct Selectors {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

fn promql_selectors(expr: &str) -> Selectors {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "atan2",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
        "inf",
        "nan",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    /// Index past the quoted string that starts at `i`.
    fn past_string(s: &[char], mut i: usize) -> usize {
        let q = s[i];
        i += 1;
        while i < s.len() && s[i] != q {
            i += if s[i] == '\\' && q != '`' { 2 } else { 1 };
        }
        i + 1
    }
    /// Index past the bracket that closes the one at `i`; identifiers inside (strings
    /// skipped) go to `idents`.
    fn past_close(s: &[char], mut i: usize, shut: char, idents: &mut BTreeSet<String>) -> usize {
        i += 1;
        while i < s.len() && s[i] != shut {
            if matches!(s[i], '"' | '\'' | '`') {
                i = past_string(s, i);
            } else if s[i].is_ascii_alphabetic() || s[i] == '_' {
                let start = i;
                while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '_') {
                    i += 1;
                }
                idents.insert(s[start..i].iter().collect());
            } else {
                i += 1;
            }
        }
        i + 1
    }
    let s: Vec<char> = expr.chars().collect();
    let mut out = Selectors::default();
    let mut ignored = BTreeSet::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c == '{' {
            i = past_close(&s, i, '}', &mut out.labels);
        } else if c == '[' {
            i = past_close(&s, i, ']', &mut ignored);
        } else if matches!(c, '"' | '\'' | '`') {
            i = past_string(&s, i);
        } else if c == '#' {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_digit() || (c == '.' && s.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '_' || s[i] == ':') {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let mut next = i;
            while next < s.len() && s[next].is_whitespace() {
                next += 1;
            }
            let paren = s.get(next) == Some(&'(');
            if LABEL_LISTS.contains(&word.as_str()) {
                if paren {
                    i = past_close(&s, next, ')', &mut out.labels);
                }
            } else if !paren && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                out.metrics.insert(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn promql_selectors_skip_functions_strings_and_keywords() {
    let expr = r#"histogram_quantile(0.99, sum by (namespace, le) (rate(a_bucket{pod!="x{y} z", le=~"0.1"}[5m])))
        > 0.05 and on (pod) sum without (comm) (rate(b_total{r="and"}[1m] offset 5m)) > bool 1e-3
        or absent(up{job=~".*"}) unless c # d_comment"#;
    let got = promql_selectors(expr);
    let metrics: Vec<&str> = got.metrics.iter().map(String::as_str).collect();
    let labels: Vec<&str> = got.labels.iter().map(String::as_str).collect();
    assert_eq!(metrics, ["a_bucket", "b_total", "c", "up"]);
    assert_eq!(labels, ["comm", "job", "le", "namespace", "pod", "r"]);
}

#[test]
fn rule_expressions_use_exported_metrics() {
    let Some(py) = python("rule_expressions_use_exported_metrics") else {
        return;
    };
    let catalogue = common::metric_catalogue();
    assert!(
        catalogue
            .get("stallwatch_runqueue_latency_seconds")
            .is_some_and(|(_, labels)| labels.contains("comm")),
        "docs/metrics.md parsed to nothing useful"
    );
    // Not in docs/metrics.md: `up` is Prometheus's own.
    const ALLOWED: &[(&str, &[&str])] = &[("up", &[])];
    // Labels every scraped series has (the ServiceMonitor sets instance to the node's name).
    const TARGET_LABELS: &[&str] = &["job", "instance"];
    // A name's labels if the agent exports it: a catalogue metric, or a histogram's series.
    let labels_of = |name: &str| -> Option<BTreeSet<String>> {
        if let Some((_, labels)) = catalogue.get(name) {
            return Some(labels.clone());
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some((kind, labels)) = name
                .strip_suffix(suffix)
                .and_then(|base| catalogue.get(base))
            {
                if kind == "histogram" {
                    let mut labels = labels.clone();
                    if suffix == "_bucket" {
                        labels.insert("le".to_string());
                    }
                    return Some(labels);
                }
            }
        }
        let (_, labels) = ALLOWED.iter().find(|(n, _)| *n == name)?;
        Some(labels.iter().map(|l| l.to_string()).collect())
    };
    let rules = yaml_doc(&py, RULES);
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .unwrap_or("?");
            let expr = rule["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: expr is not a string"));
            let sel = promql_selectors(expr);
            assert!(!sel.metrics.is_empty(), "{name}: no metric found in {expr}");
            let mut known_labels: BTreeSet<String> =
                TARGET_LABELS.iter().map(|l| l.to_string()).collect();
            for m in &sel.metrics {
                match labels_of(m) {
                    Some(labels) => known_labels.extend(labels),
                    None => problems.push(format!("{name}: metric {m} is not in docs/metrics.md")),
                }
                used.insert(m.clone());
            }
            for l in sel.labels.difference(&known_labels) {
                problems.push(format!(
                    "{name}: label {l} is not a label of {:?}",
                    sel.metrics
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "rules use what the agent does not export (renamed or removed?): {problems:#?}"
    );
    for m in [
        "stallwatch_runqueue_latency_seconds_bucket",
        "stallwatch_tcp_connections_total",
        "up",
    ] {
        assert!(
            used.contains(m),
            "{m} not found in the rules; the expression parser is broken? {used:?}"
        );
    }
}
