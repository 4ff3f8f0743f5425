//! Who a process belongs to, from its cgroup v2 path alone: a Kubernetes pod and container,
//! a container outside Kubernetes, or a systemd unit on the host. Names (pod, container)
//! come later from a Kubernetes lookup keyed by these ids.
//!
//! The path is walked from the root to the leaf and the innermost match wins, so whatever
//! sits above the pods does not matter: a kind or minikube node's own container, a custom
//! kubelet `--cgroup-root` (kind's `kubelet.slice`), a cgroup namespace boundary.
//!
//! - Pod, systemd driver: `kubepods-pod<uid>.slice` (Guaranteed) or
//!   `kubepods-{burstable,besteffort}-pod<uid>.slice`, the UID's dashes written as `_`;
//!   any words before `kubepods` (`kubelet-kubepods-...`) are a cgroup root.
//! - Pod, cgroupfs driver: `pod<uid>` under `kubepods` (Guaranteed), `burstable` or
//!   `besteffort`; under anything else (a namespace root that cut off the parent) no QoS.
//! - Container: `cri-containerd-<id>`, `crio-<id>`, `docker-<id>`, with or without `.scope`
//!   (CRI-O's sandbox cgroup has none); for cgroupfs the bare `<id>`, Docker under `docker`,
//!   else of unknown runtime. `<id>` is exactly 64 lowercase hex digits.
//! - `crio-conmon-<id>[.scope]`: CRI-O's per-container monitor. It is not in the container
//!   (kubelet charges it to the pod), so it gets runtime CRI-O and no container id: a
//!   container's numbers stay the workload's own.
//! - Unit: a segment ending in `.service`, `.scope`, `.socket`, `.mount` or `.swap` (the unit
//!   types that run processes; slices only group). The innermost one below the innermost pod
//!   or container: `None` for a process right in a container, set for systemd run inside one.
//!
//! A pod clears the container, runtime and unit found above it (they are the node's); a
//! container clears the unit above it. Anything else leaves every field empty.

/// The container runtime, as far as the path says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    #[default]
    Unknown,
}

// Series carry ids and names, not the runtime or QoS class; the spellings serve the tests
// (and `stallwatch` subcommands that may show them).
#[cfg_attr(not(test), allow(dead_code))]
impl Runtime {
    pub fn as_str(&self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
            Runtime::Unknown => "",
        }
    }
}

/// A pod's QoS class, from the kubepods level it sits under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

#[cfg_attr(not(test), allow(dead_code))]
impl QosClass {
    /// As Kubernetes spells it in `status.qosClass`.
    pub fn as_str(&self) -> &'static str {
        match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Owner {
    /// Dashed 8-4-4-4-12 lowercase; for a static pod the kubelet's own UID, 32 lowercase hex
    /// (an md5 of the manifest), which its mirror pod carries as `kubernetes.io/config.mirror`.
    pub pod_uid: Option<String>,
    /// 64 lowercase hex digits.
    pub container_id: Option<String>,
    /// Runtime of `container_id`, or CRI-O for a conmon.
    pub runtime: Runtime,
    pub qos: Option<QosClass>,
    /// The systemd unit, e.g. "ssh.service", "session-3.scope".
    pub unit: Option<String>,
}

/// A path read from /proc/<pid>/cgroup inside a private cgroup namespace without the leading
/// "/.." components (they climb above the reader's namespace root) and without trailing "/";
/// "" and "/" give "/".
pub fn normalize(path: &str) -> &str {
    let mut p = path;
    while let Some(rest) = p.strip_prefix("/..") {
        if !rest.is_empty() && !rest.starts_with('/') {
            break;
        }
        p = rest;
    }
    match p.trim_end_matches('/') {
        "" => "/",
        p => p,
    }
}

pub fn parse(path: &str) -> Owner {
    let mut owner = Owner::default();
    let mut parent = "";
    for seg in normalize(path).split('/') {
        if let Some((uid, qos)) = pod_segment(seg, parent) {
            owner = Owner {
                pod_uid: Some(uid),
                qos,
                ..Owner::default()
            };
        } else if let Some((id, runtime)) = container_segment(seg, parent) {
            owner.container_id = id.map(str::to_owned);
            owner.runtime = runtime;
            owner.unit = None;
        } else if [".service", ".scope", ".socket", ".mount", ".swap"]
            .iter()
            .any(|s| seg.strip_suffix(s).is_some_and(|stem| !stem.is_empty()))
        {
            owner.unit = Some(seg.to_owned());
        }
        parent = seg;
    }
    owner
}

fn pod_segment(seg: &str, parent: &str) -> Option<(String, Option<QosClass>)> {
    if let Some(stem) = seg.strip_suffix(".slice") {
        let (head, tail) = stem.rsplit_once('-')?;
        let uid = pod_uid(tail.strip_prefix("pod")?, b'_')?;
        let qos = if ends_with_words(head, "kubepods") {
            QosClass::Guaranteed
        } else if ends_with_words(head, "kubepods-burstable") {
            QosClass::Burstable
        } else if ends_with_words(head, "kubepods-besteffort") {
            QosClass::BestEffort
        } else {
            return None;
        };
        return Some((uid, Some(qos)));
    }
    let uid = pod_uid(seg.strip_prefix("pod")?, b'-')?;
    let qos = match parent {
        "kubepods" => Some(QosClass::Guaranteed),
        "burstable" => Some(QosClass::Burstable),
        "besteffort" => Some(QosClass::BestEffort),
        _ => None,
    };
    Some((uid, qos))
}

/// Whether `name` ends with the whole `-`-separated words `words`: systemd spells a slice's
/// ancestry in its name, so `kubelet-kubepods` is `kubepods` under a `kubelet.slice` root.
fn ends_with_words(name: &str, words: &str) -> bool {
    name.strip_suffix(words)
        .is_some_and(|h| h.is_empty() || h.ends_with('-'))
}

/// The canonical UID from its spelling in a path, `sep` between the 8-4-4-4-12 groups.
fn pod_uid(s: &str, sep: u8) -> Option<String> {
    if s.len() == 32 && s.bytes().all(is_lower_hex) {
        return Some(s.to_owned());
    }
    let grouped = s.len() == 36
        && s.bytes().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == sep,
            _ => is_lower_hex(c),
        });
    grouped.then(|| s.replace(char::from(sep), "-"))
}

/// `(container id, runtime)`; conmon is `(None, CriO)`.
fn container_segment<'a>(seg: &'a str, parent: &str) -> Option<(Option<&'a str>, Runtime)> {
    if is_container_id(seg) {
        let runtime = match parent {
            "docker" => Runtime::Docker,
            _ => Runtime::Unknown,
        };
        return Some((Some(seg), runtime));
    }
    let (prefix, id) = seg.strip_suffix(".scope").unwrap_or(seg).rsplit_once('-')?;
    if !is_container_id(id) {
        return None;
    }
    match prefix {
        "cri-containerd" => Some((Some(id), Runtime::Containerd)),
        "crio" => Some((Some(id), Runtime::CriO)),
        "docker" => Some((Some(id), Runtime::Docker)),
        "crio-conmon" => Some((None, Runtime::CriO)),
        _ => None,
    }
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(is_lower_hex)
}

fn is_lower_hex(c: u8) -> bool {
    c.is_ascii_digit() || (b'a'..=b'f').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d";
    const UID: &str = "2c9f8a79-5391-454b-88cb-86190881cb96";

    /// Two lines a case: a path, then `pod_uid qos container_id runtime unit` with `-` for
    /// none. `ID` and `UID` stand for the constants, `UID_` for the UID spelled with `_`.
    /// Real paths as printed in netdata/netdata#4868 (containerd node; static pods with md5
    /// UIDs), kubernetes/minikube#11280 (CRI-O in minikube's docker node),
    /// kontena/pharos-cluster#440 (dockershim), cri-o/cri-o#8904 (conmon), and public test
    /// fixtures (kepler: kind, cgroupfs; pixie: GKE; neuvector, datadog: docker).
    const CASES: &str = "
/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod55c6c714_b240_4dec_9a45_57b61696ab6e.slice/cri-containerd-2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36.scope
  55c6c714-b240-4dec-9a45-57b61696ab6e Burstable 2032491dcae31e6746f47daa0ac74564f2843a1bd847c5e6c4eb501ca132ac36 containerd -
/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8daa50c3a64c9ff60bb9eab7b44b56fd.slice/cri-containerd-2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5.scope
  8daa50c3a64c9ff60bb9eab7b44b56fd Burstable 2884d57c0e100d7a9a2f9487ce0bc2986bca3430e988af7a4865aff061f51ac5 containerd -
/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod2c9f8a79_5391_454b_88cb_86190881cb96.slice/crio-a09343ca97901516c25036e2b954421254f8c68b384b536064e8999f0c4ed18d.scope
  UID Burstable a09343ca97901516c25036e2b954421254f8c68b384b536064e8999f0c4ed18d cri-o -
/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9692aa0e_748e_11e8_8dfa_76d458035df6.slice/docker-f58c1c55e72c336d11c6af795260b57f7597d62e4d16951086f754d2e9ce5114.scope
  9692aa0e-748e-11e8-8dfa-76d458035df6 BestEffort f58c1c55e72c336d11c6af795260b57f7597d62e4d16951086f754d2e9ce5114 docker -
/kubepods.slice/kubepods-podUID_.slice/crio-ID.scope
  UID Guaranteed ID cri-o -
/kubepods.slice/kubepods-podUID_.slice/crio-ID.scope/container
  UID Guaranteed ID cri-o -
/kubepods.slice/kubepods-podUID_.slice/crio-ID
  UID Guaranteed ID cri-o -
/kubepods.slice/kubepods-podUID_.slice/crio-conmon-0644511bc2734f5ff9f9532fdecddb9f1b92597fe269168b137ada040c3a3118.scope
  UID Guaranteed - cri-o -
/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podUID_.slice
  UID Burstable - - -
/kubepods/burstable/podf6adb0af-0855-4bab-b25b-c853f18d0ce2/35b97177dada20362ab90d90ac63cd54e8a41cf87bea34f270631b6da17f4a93
  f6adb0af-0855-4bab-b25b-c853f18d0ce2 Burstable 35b97177dada20362ab90d90ac63cd54e8a41cf87bea34f270631b6da17f4a93 - -
/kubepods/pod8dbc5577-d0e2-4706-8787-57d52c03ddf2/14011c7d92a9e513dfd69211da0413dbf319a5e45a02b354ba6e98e10272542d
  8dbc5577-d0e2-4706-8787-57d52c03ddf2 Guaranteed 14011c7d92a9e513dfd69211da0413dbf319a5e45a02b354ba6e98e10272542d - -
/kubelet/kubepods/besteffort/podbdd4097d-6795-404e-9bd8-6a1383386198/c79788e0da15a6597263eb2b9c51d05dd1a9a1d08c53c1161dc8c45d2dac6b38
  bdd4097d-6795-404e-9bd8-6a1383386198 BestEffort c79788e0da15a6597263eb2b9c51d05dd1a9a1d08c53c1161dc8c45d2dac6b38 - -
/kubepods/besteffort/podUID/crio-conmon-ID
  UID BestEffort - cri-o -
/kubepods/burstable/podUID/
  UID Burstable - - -
/../../../burstable/podUID/ID
  UID Burstable ID - -
/../../pode039200acb850c82bb901653cc38ff6e/58452031ab6dcaa4fe3ff91f8a46fd41a4a2405586f3cf3d5cb9c93b5bcf62cc
  e039200acb850c82bb901653cc38ff6e - 58452031ab6dcaa4fe3ff91f8a46fd41a4a2405586f3cf3d5cb9c93b5bcf62cc - -
/system.slice/docker-fd9d0ea06257a9780827cbc7fd92e3812a54fca26d63e191b73610d5d48b9cbd.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-podeab5a334_93fe_48a8_b139_9e8079c1f163.slice/cri-containerd-99f3a16ea25b7724cb56a4f0c0df1113ad9474fbf5545bead97fd5c7f61c13f4.scope
  eab5a334-93fe-48a8-b139-9e8079c1f163 BestEffort 99f3a16ea25b7724cb56a4f0c0df1113ad9474fbf5545bead97fd5c7f61c13f4 containerd -
/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod20da609e_6973_4463_a1f9_2db9bcc5becc.slice/cri-containerd-10ec3c89629f71226b227e6510b2d465168b24005bbdcc5d7940517080830635.scope
  20da609e-6973-4463-a1f9-2db9bcc5becc Guaranteed 10ec3c89629f71226b227e6510b2d465168b24005bbdcc5d7940517080830635 containerd -
/docker/d6701ec289c56e4391acb11d07474b3139466857a305490575508a8b7a9fcf22/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod2ca4a155_3599_498d_bb9d_4446693fa3ea.slice/crio-358607a37e7ada357032e7f5729c9ae6a3efdb7962acbcbe47ff6a3c5506cb1c.scope
  2ca4a155-3599-498d-bb9d-4446693fa3ea BestEffort 358607a37e7ada357032e7f5729c9ae6a3efdb7962acbcbe47ff6a3c5506cb1c cri-o -
/system.slice/docker-ID.scope/kubepods/podUID
  UID Guaranteed - - -
/system.slice/docker-ID.scope/system.slice/containerd.service
  - - ID docker containerd.service
/system.slice/docker-9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d.scope
  - - ID docker -
/docker/3726184226f5d3147c25fdeab5b60097e378e8a720503a5e19ecfdf29f869860
  - - 3726184226f5d3147c25fdeab5b60097e378e8a720503a5e19ecfdf29f869860 docker -
/system.slice/crio-conmon-5819a498721cf8bb7e334809c9e48aa310bfc98801eb8017034ad17fb0749920.scope
  - - - cri-o -
/system.slice/ssh.service
  - - - - ssh.service
/system.slice/system-getty.slice/getty@tty1.service
  - - - - getty@tty1.service
/user.slice/user-1000.slice/session-915.scope
  - - - - session-915.scope
/user.slice/user-0.slice/user@0.service
  - - - - user@0.service
/user.slice/user-1000.slice/user@1000.service/app.slice/app-org.gnome.Terminal.slice/vte-spawn-4f0c.scope
  - - - - vte-spawn-4f0c.scope
/system.slice/home.mount
  - - - - home.mount
/../../../system.slice/foo.service
  - - - - foo.service
/init.scope
  - - - - init.scope
/system.slice/docker-9EC39B91F3D70E1BEFF50A308F77067065EA6BE0D91A3378375056CD4422CF3D.scope
  - - - - docker-9EC39B91F3D70E1BEFF50A308F77067065EA6BE0D91A3378375056CD4422CF3D.scope
/system.slice/docker-ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d.scope
  - - - - docker-ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d.scope
/docker/ID0
  - - - - -
/kubepods/burstable/pod2C9F8A79-5391-454B-88CB-86190881CB96/9EC39B91F3D70E1BEFF50A308F77067065EA6BE0D91A3378375056CD4422CF3D
  - - - - -
/kubepods/burstable/podUID_/c39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d
  - - - - -
/system.slice/kubepods-burstable-podUID.slice
  - - - - -
/machine.slice/foo-podUID_.slice/kubepods-burstable.slice
  - - - - -
";

    fn cases() -> Vec<(String, String)> {
        let text = CASES
            .replace("UID_", &UID.replace('-', "_"))
            .replace("UID", UID)
            .replace("ID", ID);
        let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        lines
            .chunks(2)
            .map(|c| (c[0].to_owned(), c[1].trim().to_owned()))
            .collect()
    }

    fn show(o: &Owner) -> String {
        let or_dash = |s: Option<&str>| s.unwrap_or("-").to_owned();
        let runtime = Some(o.runtime.as_str()).filter(|s| !s.is_empty());
        [
            or_dash(o.pod_uid.as_deref()),
            or_dash(o.qos.map(|q| q.as_str())),
            or_dash(o.container_id.as_deref()),
            or_dash(runtime),
            or_dash(o.unit.as_deref()),
        ]
        .join(" ")
    }

    #[test]
    fn real_and_near_miss_paths() {
        for (path, want) in cases() {
            assert_eq!(show(&parse(&path)), want, "{path}");
        }
        for path in [
            "",
            "/",
            "/..",
            "/system.slice",
            "/kubepods.slice",
            ".scope",
            "/-",
            "/pod",
        ] {
            assert_eq!(parse(path), Owner::default(), "{path:?}");
        }
    }

    #[test]
    fn normalize_strips_the_namespace_climb() {
        for (path, want) in [
            ("/../../kubepods.slice/x.scope", "/kubepods.slice/x.scope"),
            (
                "/../../../system.slice/foo.service/",
                "/system.slice/foo.service",
            ),
            ("/..", "/"),
            ("", "/"),
            ("//", "/"),
            ("/..foo/..", "/..foo/.."),
        ] {
            assert_eq!(normalize(path), want, "{path:?}");
        }
    }

    /// Truncated, spliced and corrupted real paths never panic, and what comes out is well
    /// formed (checked without the parser's own helpers).
    #[test]
    fn mutated_paths_give_well_formed_owners() {
        let hex = |s: &str| s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as usize
        };
        for (real, _) in cases() {
            let r = real.as_bytes();
            let mut variants: Vec<Vec<u8>> = (0..=r.len())
                .flat_map(|i| [r[..i].to_vec(), r[i..].to_vec()])
                .collect();
            for _ in 0..2000 {
                let mut b = r.to_vec();
                for _ in 0..1 + next() % 4 {
                    let (i, j) = (next() % b.len().max(1), next() % r.len());
                    match next() % 5 {
                        0 if !b.is_empty() => drop(b.remove(i)),
                        1 => b.insert(i, b"/-_.pA0"[next() % 7]),
                        2 if !b.is_empty() => b[i] = b[i].to_ascii_uppercase(),
                        3 => b.extend_from_slice(&r[j..]),
                        _ => drop(b.splice(i..i, "é".bytes())),
                    }
                }
                variants.push(b);
            }
            for v in &variants {
                let path = String::from_utf8_lossy(v);
                let o = parse(&path);
                if let Some(id) = &o.container_id {
                    assert!(id.len() == 64 && hex(id), "{path:?} -> {id}");
                }
                if let Some(uid) = &o.pod_uid {
                    let groups: Vec<&str> = uid.split('-').collect();
                    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
                    let ok = lens == [8, 4, 4, 4, 12] || lens == [32];
                    assert!(ok && groups.iter().all(|g| hex(g)), "{path:?} -> {uid}");
                }
                if let Some(unit) = &o.unit {
                    assert!(!unit.contains('/') && unit.contains('.'), "{path:?}");
                }
            }
        }
    }
}
