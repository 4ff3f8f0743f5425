//! The panel renderer behind `cargo xtask dashboards-preview` (tests/common/preview.rs), on synthetic data.
//! STALLWATCH_PREVIEW_DIR=/some/dir keeps the PNGs there to look at.

#[path = "common/preview.rs"]
mod preview;

use std::collections::HashSet;
use std::path::PathBuf;

use preview::*;

const T0: f64 = 1_700_000_000.0; // 22:13:20 UTC
const STEP: f64 = 15.0;
const N: usize = 60;

fn out_dir() -> PathBuf {
    let dir = std::env::var_os("STALLWATCH_PREVIEW_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("stallwatch-preview-{}", std::process::id()))
        });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic noise in 0..1.
fn noise(i: usize, salt: usize) -> f64 {
    let x = (i as u64 * 2654435761 + salt as u64 * 40503).wrapping_mul(6364136223846793005) >> 33;
    (x % 10_000) as f64 / 10_000.0
}

fn series(label: &str, f: impl Fn(usize) -> f64) -> Series {
    Series {
        label: label.into(),
        points: (0..N).map(|i| (T0 + i as f64 * STEP, f(i))).collect(),
    }
}

fn units() -> Vec<Series> {
    let names = [
        "postgres.service",
        "nginx.service",
        "kubelet.service",
        "containerd.service",
        "sshd.service",
        "systemd-journald.service",
        "cron.service",
        "node-exporter.service",
        "redis.service",
        "envoy.service",
        "fluent-bit.service",
        "chronyd.service",
    ];
    names
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let base = 0.004 / (k as f64 + 1.0).powf(1.3);
            series(n, |i| {
                let burst = if k == 0 && (25..35).contains(&i) {
                    0.012
                } else {
                    0.0
                };
                base * (0.7 + 0.6 * noise(i, k)) + burst
            })
        })
        .collect()
}

/// Cumulative per-interval bucket counts as Prometheus returns `sum by (le) (increase(..._bucket[1m]))`:
/// stallwatch's 28 log2 buckets (1.024 µs .. 68.7 s, +Inf), a mode around 16 µs and, for a while,
/// a second one around 4 ms.
fn histogram() -> Vec<Series> {
    let mut les: Vec<String> = (0..27)
        .map(|i| format!("{}", (1u64 << (i + 10)) as f64 / 1e9))
        .collect();
    les.push("+Inf".into());
    let mut cumulative = vec![vec![0.0; N]; les.len()];
    for t in 0..N {
        let mut acc = 0.0;
        for (b, row) in cumulative.iter_mut().enumerate() {
            let d = b as f64 - 4.0; // bucket 4 = 16.4 µs
            let mut c = 5000.0 * (-d * d / 3.0).exp() * (0.8 + 0.4 * noise(t, b));
            if (20..42).contains(&t) {
                let d2 = b as f64 - 12.0; // 4.19 ms
                c += 300.0 * (-d2 * d2 / 1.5).exp() * (0.5 + noise(t, b + 99));
            }
            if b == 17 && t % 9 == 0 {
                c += 2.0; // a rare 134 ms stall
            }
            acc += c.round();
            row[t] = acc;
        }
    }
    les.iter()
        .zip(cumulative)
        .map(|(le, row)| series(le, |i| row[i]))
        .collect()
}

fn render(name: &str, kind: PanelKind, title: &str, data: &[Series], w: u32, h: u32) -> Rgb {
    let path = out_dir().join(format!("{name}.png"));
    render_png(
        &Panel {
            title,
            kind,
            series: data,
        },
        &path,
        w,
        h,
    )
    .unwrap_or_else(|e| panic!("rendering {name}: {e:#}"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let img = decode_png(&bytes).unwrap_or_else(|e| panic!("decoding {}: {e:#}", path.display()));
    assert_eq!((img.width, img.height), (w, h), "{}", path.display());
    img
}

fn distinct_colors(img: &Rgb) -> usize {
    img.pixels.iter().collect::<HashSet<_>>().len()
}

fn assert_rich(name: &str, img: &Rgb) {
    let n = distinct_colors(img);
    assert!(n > 100, "{name}: only {n} distinct colors");
}

#[test]
fn time_series_renders() {
    let img = render(
        "timeseries",
        PanelKind::TimeSeries {
            unit: Unit::Seconds,
        },
        "Run-queue latency p99 by unit",
        &units(),
        900,
        320,
    );
    assert_rich("timeseries", &img);
}

#[test]
fn heatmap_renders() {
    let img = render(
        "heatmap",
        PanelKind::Heatmap,
        "Run-queue latency",
        &histogram(),
        900,
        320,
    );
    assert_rich("heatmap", &img);
    // Cells are drawn in the heatmap's oranges.
    assert!(
        img.pixels
            .iter()
            .any(|p| p[0] > 200 && p[1] > 60 && p[1] < 140 && p[2] < 60),
        "no orange cell"
    );
}

#[test]
fn stat_renders() {
    let cpu = [series("agent", |i| 0.012 + 0.004 * noise(i, 7))];
    let img = render(
        "stat",
        PanelKind::Stat {
            unit: Unit::Percent01,
        },
        "Agent CPU",
        &cpu,
        300,
        180,
    );
    assert_rich("stat", &img);
}

#[test]
fn stat_with_several_series_renders_a_grid() {
    let probes: Vec<Series> = ["sched", "offcpu", "syscalls", "tcp", "gc", "runtime"]
        .iter()
        .map(|p| Series {
            label: p.to_string(),
            points: vec![(T0, if *p == "gc" { 0.0 } else { 1.0 })],
        })
        .collect();
    let img = render(
        "stat-grid",
        PanelKind::Stat { unit: Unit::None },
        "Probes attached",
        &probes,
        400,
        180,
    );
    assert_rich("stat-grid", &img);
}

#[test]
fn table_renders() {
    let rss: Vec<Series> = units()
        .into_iter()
        .enumerate()
        .map(|(k, s)| Series {
            points: s
                .points
                .iter()
                .map(|&(t, _)| (t, 3.0e8 / (k as f64 + 1.0).powi(2)))
                .collect(),
            ..s
        })
        .collect();
    let img = render(
        "table",
        PanelKind::Table { unit: Unit::Bytes },
        "Memory by unit",
        &rss,
        500,
        300,
    );
    assert_rich("table", &img);
}

#[test]
fn bar_gauge_renders() {
    let rates: Vec<Series> = [
        "read",
        "write",
        "futex",
        "epoll_wait",
        "recvfrom",
        "sendto",
        "openat",
        "mmap",
        "close",
    ]
    .iter()
    .enumerate()
    .map(|(k, n)| {
        series(n, |i| {
            12_000.0 / (k as f64 + 1.0).powf(1.5) * (0.9 + 0.2 * noise(i, k))
        })
    })
    .collect();
    let img = render(
        "bargauge",
        PanelKind::BarGauge {
            unit: Unit::PerSecond,
        },
        "Syscalls per second",
        &rates,
        500,
        300,
    );
    assert_rich("bargauge", &img);
}

#[test]
fn no_data_renders_the_frame() {
    let empty_points = [Series {
        label: "x".into(),
        points: vec![],
    }];
    let nan_points = [Series {
        label: "0.001".into(),
        points: vec![(T0, f64::NAN)],
    }];
    for (i, kind) in [
        PanelKind::TimeSeries {
            unit: Unit::Seconds,
        },
        PanelKind::Heatmap,
        PanelKind::Stat {
            unit: Unit::Percent01,
        },
        PanelKind::Table { unit: Unit::Bytes },
        PanelKind::BarGauge {
            unit: Unit::PerSecond,
        },
    ]
    .into_iter()
    .enumerate()
    {
        for (j, data) in [&[][..], &empty_points[..], &nan_points[..]]
            .into_iter()
            .enumerate()
        {
            if kind == PanelKind::Heatmap && j == 1 {
                continue; // "x" is no `le` bound: that is an error, tested below
            }
            let img = render(
                &format!("nodata-{i}-{j}"),
                kind,
                "Nothing here",
                data,
                400,
                200,
            );
            let n = distinct_colors(&img);
            assert!(
                n > 10,
                "no-data panel {kind:?}/{j}: only {n} colors (no title or text?)"
            );
        }
    }
}

#[test]
fn heatmap_rejects_labels_that_are_no_bounds() {
    let data = [Series {
        label: "p99".into(),
        points: vec![(T0, 1.0)],
    }];
    let err = render_png_bytes(
        &Panel {
            title: "x",
            kind: PanelKind::Heatmap,
            series: &data,
        },
        400,
        200,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("p99"), "{err:#}");
}

#[test]
fn tiny_and_odd_inputs_do_not_panic() {
    let one = [Series {
        label: String::new(),
        points: vec![(T0, 5.0)],
    }];
    let flat = [series("flat", |_| 0.0)];
    let neg = [series("neg", |i| -(i as f64))];
    for kind in [
        PanelKind::TimeSeries { unit: Unit::None },
        PanelKind::Stat { unit: Unit::None },
        PanelKind::Table { unit: Unit::None },
        PanelKind::BarGauge { unit: Unit::None },
    ] {
        for data in [&one[..], &flat[..], &neg[..], &units()[..]] {
            for (w, h) in [(16, 16), (120, 60), (400, 200)] {
                render_png_bytes(
                    &Panel {
                        title: "A rather long title that will not fit",
                        kind,
                        series: data,
                    },
                    w,
                    h,
                )
                .unwrap_or_else(|e| panic!("{kind:?} {w}x{h}: {e:#}"));
            }
        }
    }
    for (w, h) in [(16, 16), (120, 60)] {
        render_png_bytes(
            &Panel {
                title: "h",
                kind: PanelKind::Heatmap,
                series: &histogram(),
            },
            w,
            h,
        )
        .unwrap();
    }
    assert!(render_png_bytes(
        &Panel {
            title: "x",
            kind: PanelKind::Stat { unit: Unit::None },
            series: &one
        },
        0,
        10
    )
    .is_err());
}

#[test]
fn decode_png_checks_crc() {
    let data = [series("a", |i| i as f64)];
    let mut png = render_png_bytes(
        &Panel {
            title: "x",
            kind: PanelKind::Stat { unit: Unit::None },
            series: &data,
        },
        64,
        32,
    )
    .unwrap();
    assert!(decode_png(&png).is_ok());
    let n = png.len();
    png[n - 20] ^= 0xff; // inside the IDAT data
    assert!(decode_png(&png).is_err());
}

#[test]
fn formats_values_by_unit() {
    let cases = [
        (0.000002048, Unit::Seconds, "2.05 µs"),
        (0.000000512, Unit::Seconds, "512 ns"),
        (0.0015, Unit::Seconds, "1.5 ms"),
        (0.9996, Unit::Seconds, "1 s"),
        (0.0, Unit::Seconds, "0 s"),
        (90.0, Unit::Seconds, "1.5 min"),
        (7200.0, Unit::Seconds, "2 h"),
        (68.719476736, Unit::Seconds, "1.15 min"),
        (1536.0, Unit::Bytes, "1.5 KiB"),
        (512.0, Unit::Bytes, "512 B"),
        (3.0 * 1024.0 * 1024.0, Unit::Bytes, "3 MiB"),
        (1023.0, Unit::Bytes, "1023 B"),
        (1023.9 * 1024.0, Unit::Bytes, "1024 KiB"),
        (0.25, Unit::Percent01, "25%"),
        (0.0123, Unit::Percent01, "1.23%"),
        (1.0, Unit::Percent01, "100%"),
        (1500.0, Unit::PerSecond, "1.5K/s"),
        (0.5, Unit::PerSecond, "0.5/s"),
        (2_000_000.0, Unit::None, "2M"),
        (-0.004, Unit::Seconds, "-4 ms"),
        (f64::NAN, Unit::None, "NaN"),
    ];
    for (v, unit, want) in cases {
        assert_eq!(format_value(v, unit), want, "{v} {unit:?}");
    }
    assert_eq!(format_value(0.35, Unit::SecondsPerSecond), "0.35 s/s");
    assert_eq!(Unit::from_grafana("percentunit"), Unit::Percent01);
    assert_eq!(Unit::from_grafana("suffix: s/s"), Unit::SecondsPerSecond);
    assert_eq!(Unit::from_grafana("cps"), Unit::PerSecond);
    assert_eq!(Unit::from_grafana("short"), Unit::None);
    assert_eq!(format_le("0.000002048"), "2.05 µs");
    assert_eq!(format_le("0.000001024"), "1.02 µs");
    assert_eq!(format_le("68.719476736"), "1.15 min");
    assert_eq!(format_le("+Inf"), "+Inf");
    assert_eq!(format_le("le=\"0.004194304\""), "4.19 ms");
    assert_eq!(format_clock(T0), "22:13:20");
    assert_eq!(format_clock(0.0), "00:00:00");
    assert_eq!(format_clock(86_399.4), "23:59:59");
}

#[test]
fn gallery_of_edge_cases() {
    // Percent with a gap (absent steps break the line) and a short span.
    let mut gappy = series("cpu", |i| 0.3 + 0.4 * noise(i, 1));
    gappy.points.truncate(12);
    gappy
        .points
        .retain(|(t, _)| !(T0 + 70.0..T0 + 100.0).contains(t));
    let other = Series {
        label: "steal".into(),
        points: gappy.points.iter().map(|&(t, v)| (t, v / 4.0)).collect(),
    };
    render(
        "g-percent",
        PanelKind::TimeSeries {
            unit: Unit::Percent01,
        },
        "CPU (short span, gap)",
        &[gappy, other],
        600,
        260,
    );
    // Bytes over six hours.
    let long = Series {
        label: "rss".into(),
        points: (0..360)
            .map(|i| (T0 + i as f64 * 60.0, 40.0 * 1048576.0 + 2e7 * noise(i, 3)))
            .collect(),
    };
    render(
        "g-bytes",
        PanelKind::TimeSeries { unit: Unit::Bytes },
        "Agent RSS (6 h)",
        &[long],
        600,
        260,
    );
    // A single point and a per-second series.
    let one = [Series {
        label: String::new(),
        points: vec![(T0, 1234.0)],
    }];
    render(
        "g-one",
        PanelKind::TimeSeries {
            unit: Unit::PerSecond,
        },
        "One sample",
        &one,
        600,
        260,
    );
    // Non-cumulative, sparse heatmap input.
    let sparse: Vec<Series> = [
        "0.000065536",
        "0.000131072",
        "0.000262144",
        "0.000524288",
        "0.001048576",
        "+Inf",
    ]
    .iter()
    .enumerate()
    .map(|(b, le)| {
        series(le, |i| {
            if (i + b) % 7 == 0 {
                (b * 3 + 1) as f64
            } else {
                0.0
            }
        })
    })
    .collect();
    render(
        "g-sparse-heatmap",
        PanelKind::Heatmap,
        "Sparse, per-bucket input",
        &sparse,
        600,
        260,
    );
    render(
        "g-small-ts",
        PanelKind::TimeSeries {
            unit: Unit::Seconds,
        },
        "Small",
        &units(),
        240,
        120,
    );
    render(
        "g-small-heat",
        PanelKind::Heatmap,
        "Small heatmap",
        &histogram(),
        240,
        120,
    );
    render(
        "g-small-bar",
        PanelKind::BarGauge { unit: Unit::Bytes },
        "Small bars",
        &units(),
        240,
        120,
    );
    render(
        "g-stat-big",
        PanelKind::Stat {
            unit: Unit::Seconds,
        },
        "p99",
        &[series("x", |i| 0.00042 + 1e-5 * i as f64)],
        800,
        400,
    );
}
