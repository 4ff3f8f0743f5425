//! `stallwatch top`: processes ranked by a stall signal, live in the terminal (or one plain
//! table with `--once` / when stdout is not a terminal).
//!
//! The probes run in-process with per-process series; every interval the view shows what
//! each process accumulated during that interval.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::bail;
use prometheus::proto::MetricFamily;

use crate::app::App;
use crate::config::Config;
use crate::diagnose::{per_process, Hist, Sample};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Refresh interval.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Sort by: runq (run-queue p99), wait (run-queue time), offcpu (blocked time), io (D
    /// state), syscall (syscall p99), tcp (connect p99), pause (longest runtime pause).
    #[arg(long, default_value = "runq", value_parser = parse_sort)]
    pub sort: Sort,
    /// Show only processes whose comm contains this.
    #[arg(long)]
    pub comm: Option<String>,
    /// Show only this process.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Show only processes whose cgroup path contains this.
    #[arg(long)]
    pub cgroup: Option<String>,
    /// Print one plain table after one interval and exit (also when stdout is not a terminal).
    #[arg(long)]
    pub once: bool,
    /// Rows in the plain table.
    #[arg(long, default_value_t = 20)]
    pub rows: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    Runq,
    Wait,
    Offcpu,
    Io,
    Syscall,
    Tcp,
    Pause,
}

impl Sort {
    const ALL: [Sort; 7] = [
        Sort::Runq,
        Sort::Wait,
        Sort::Offcpu,
        Sort::Io,
        Sort::Syscall,
        Sort::Tcp,
        Sort::Pause,
    ];
    fn name(self) -> &'static str {
        match self {
            Sort::Runq => "runq",
            Sort::Wait => "wait",
            Sort::Offcpu => "offcpu",
            Sort::Io => "io",
            Sort::Syscall => "syscall",
            Sort::Tcp => "tcp",
            Sort::Pause => "pause",
        }
    }
    fn next(self) -> Sort {
        let i = Sort::ALL.iter().position(|s| *s == self).unwrap_or(0);
        Sort::ALL[(i + 1) % Sort::ALL.len()]
    }
}

fn parse_sort(s: &str) -> Result<Sort, String> {
    Sort::ALL
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| {
            format!(
                "unknown sort key {s:?} (one of {})",
                Sort::ALL.map(Sort::name).join(", ")
            )
        })
}

/// One process's signals over one interval.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub pid: u32,
    pub comm: String,
    pub cgroup: String,
    pub runq: Hist,
    pub offcpu_s: f64,
    pub io_s: f64,
    pub syscalls: Hist,
    pub top_class: String,
    pub connect: Hist,
    pub connect_failed: f64,
    pub pause: Hist,
}

impl Row {
    fn key(&self, sort: Sort) -> f64 {
        match sort {
            Sort::Runq => p99(&self.runq).unwrap_or(0.0),
            Sort::Wait => self.runq.sum_seconds,
            Sort::Offcpu => self.offcpu_s,
            Sort::Io => self.io_s,
            Sort::Syscall => p99(&self.syscalls).unwrap_or(0.0),
            // Failed connects first, then the slowest.
            Sort::Tcp => self.connect_failed * 1e6 + p99(&self.connect).unwrap_or(0.0),
            Sort::Pause => max_le(&self.pause).unwrap_or(0.0),
        }
    }
}

/// The p99's bucket bound; +Inf when it is in the last bucket, None when empty.
fn p99(h: &Hist) -> Option<f64> {
    (h.count() > 0).then(|| h.quantile_le(0.99).unwrap_or(f64::INFINITY))
}

fn max_le(h: &Hist) -> Option<f64> {
    h.counts
        .iter()
        .rposition(|c| *c > 0)
        .and_then(|i| h.le.get(i).copied().or(Some(f64::INFINITY)))
}

type Totals = BTreeMap<(u32, String, Vec<(String, String)>), Sample>;

/// Every per-process series by (pid, family, other labels), with comm and cgroup per pid.
fn totals(families: &[MetricFamily]) -> (Totals, HashMap<u32, (String, String)>) {
    let mut t = Totals::new();
    let mut names = HashMap::new();
    for x in per_process(families) {
        names
            .entry(x.pid)
            .or_insert_with(|| (x.comm.to_string(), x.cgroup.to_string()));
        // Several series can share a pid (the image before and after an exec, kept for
        // exit_grace): add them up.
        let slot = t
            .entry((x.pid, x.family.to_string(), x.labels))
            .or_insert(match &x.sample {
                Sample::Hist(_) => Sample::Hist(Hist::default()),
                Sample::Value(_) => Sample::Value(0.0),
            });
        match (slot, x.sample) {
            (Sample::Hist(a), Sample::Hist(b)) => a.add(&b),
            (Sample::Value(a), Sample::Value(b)) => *a += b,
            _ => {}
        }
    }
    (t, names)
}

/// Rows for the interval between two gathers.
fn rows(prev: &Totals, now: &Totals, names: &HashMap<u32, (String, String)>) -> Vec<Row> {
    let mut out: BTreeMap<u32, Row> = BTreeMap::new();
    let mut class_time: HashMap<(u32, String), f64> = HashMap::new();
    for (key @ (pid, family, labels), v) in now {
        let label = |k: &str| {
            labels
                .iter()
                .find(|(lk, _)| lk == k)
                .map(|(_, v)| v.as_str())
        };
        let row = out.entry(*pid).or_insert_with(|| {
            let (comm, cgroup) = names.get(pid).cloned().unwrap_or_default();
            Row {
                pid: *pid,
                comm,
                cgroup,
                ..Row::default()
            }
        });
        match (v, prev.get(key)) {
            (Sample::Hist(h), p) => {
                let p = match p {
                    Some(Sample::Hist(p)) => Some(p),
                    _ => None,
                };
                let d = h.minus(p);
                match family.as_str() {
                    "stallwatch_runqueue_latency_seconds" => row.runq.add(&d),
                    "stallwatch_syscall_latency_seconds" => {
                        if let Some(c) = label("class") {
                            *class_time.entry((*pid, c.to_string())).or_default() += d.sum_seconds;
                        }
                        row.syscalls.add(&d)
                    }
                    "stallwatch_tcp_connect_latency_seconds" => row.connect.add(&d),
                    "stallwatch_runtime_pause_seconds" => row.pause.add(&d),
                    _ => {}
                }
            }
            (Sample::Value(v), p) => {
                let p = match p {
                    Some(Sample::Value(p)) => *p,
                    _ => 0.0,
                };
                let d = (v - p).max(0.0);
                match (family.as_str(), label("reason"), label("result")) {
                    (
                        "stallwatch_offcpu_seconds_total",
                        Some("voluntary" | "uninterruptible"),
                        _,
                    ) => {
                        row.offcpu_s += d;
                        if label("reason") == Some("uninterruptible") {
                            row.io_s += d;
                        }
                    }
                    ("stallwatch_tcp_connections_total", _, Some(r))
                        if label("direction") == Some("outbound") && r != "established" =>
                    {
                        row.connect_failed += d
                    }
                    _ => {}
                }
            }
        }
    }
    let mut best: HashMap<u32, f64> = HashMap::new();
    for ((pid, class), secs) in class_time {
        if let Some(r) = out.get_mut(&pid) {
            let b = best.entry(pid).or_insert(0.0);
            if secs > *b {
                *b = secs;
                r.top_class = class;
            }
        }
    }
    out.into_values().collect()
}

struct Filter {
    comm: Option<String>,
    pid: Option<u32>,
    cgroup: Option<String>,
}

impl Filter {
    fn keeps(&self, r: &Row) -> bool {
        self.comm
            .as_ref()
            .is_none_or(|c| r.comm.contains(c.as_str()))
            && self.pid.is_none_or(|p| r.pid == p)
            && self
                .cgroup
                .as_ref()
                .is_none_or(|c| r.cgroup.contains(c.as_str()))
    }
}

fn active(r: &Row) -> bool {
    r.runq.count() > 0
        || r.offcpu_s > 0.0
        || r.syscalls.count() > 0
        || r.pause.count() > 0
        || r.connect.count() > 0
        || r.connect_failed > 0.0
}

fn sorted(mut rows: Vec<Row>, sort: Sort, filter: &Filter) -> Vec<Row> {
    rows.retain(|r| filter.keeps(r) && active(r));
    rows.sort_by(|a, b| b.key(sort).total_cmp(&a.key(sort)).then(a.pid.cmp(&b.pid)));
    rows
}

/// A latency bound, compact: µs below 10 ms, then ms, then s.
fn us(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(v) if v.is_infinite() => "inf".into(),
        Some(v) if v < 0.01 => format!("{:.0}", v * 1e6),
        Some(v) if v < 10.0 => format!("{:.0}ms", v * 1e3),
        Some(v) => format!("{v:.0}s"),
    }
}

const HEADER: [&str; 11] = [
    "PID", "COMM", "RQ_P99", "WAIT%", "OFF%", "D%", "SYS_P99", "TOP_SYS", "CON_P99", "CFAIL",
    "PAUSE",
];
/// Column widths: with single spaces between them, 80 columns.
const WIDTHS: [u16; 11] = [7, 10, 7, 5, 5, 4, 7, 7, 7, 5, 6];

/// Cells of one row; percentages of the interval (can exceed 100 with several threads).
fn cells(r: &Row, interval: f64) -> [String; 11] {
    let pct = |s: f64| {
        let p = 100.0 * s / interval.max(1e-9);
        if p >= 999.5 {
            "999+".to_string()
        } else {
            format!("{p:.0}")
        }
    };
    [
        r.pid.to_string(),
        r.comm.chars().take(10).collect(),
        us(p99(&r.runq)),
        pct(r.runq.sum_seconds),
        pct(r.offcpu_s),
        pct(r.io_s),
        us(p99(&r.syscalls)),
        r.top_class.chars().take(7).collect(),
        us(p99(&r.connect)),
        format!("{:.0}", r.connect_failed),
        us(max_le(&r.pause)),
    ]
}

/// The plain table (p99 and max columns are log2 bucket upper bounds, in µs).
pub fn plain_table(rows: &[Row], interval: f64, sort: Sort, max: usize) -> String {
    let mut out = format!(
        "stallwatch top: {} processes, sorted by {}, interval {:.1} s (latencies: us, or ms/s)\n",
        rows.len(),
        sort.name(),
        interval
    );
    let line = |c: &[String]| {
        c.iter()
            .zip(WIDTHS)
            .map(|(s, w)| format!("{s:<w$}", w = w as usize))
            .collect::<Vec<_>>()
            .join(" ")
            .trim_end()
            .to_string()
    };
    out.push_str(&line(&HEADER.map(String::from)));
    out.push('\n');
    for r in rows.iter().take(max) {
        out.push_str(&line(&cells(r, interval)));
        out.push('\n');
    }
    out
}

fn start_app() -> anyhow::Result<(App, tokio::runtime::Runtime)> {
    let missing = crate::check::missing_caps(crate::check::effective_caps());
    if !missing.is_empty() {
        bail!(
            "top loads BPF programs and needs {} (run it as root)",
            missing.join(" and ")
        );
    }
    let config = Config {
        probes: vec!["sched".into(), "syscalls".into(), "tcp".into(), "gc".into()],
        per_pid: true,
        // Every process keeps its own row (no `_other` fold).
        max_series: 0,
        ..Config::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (app, tasks) = App::start(config)?;
    for t in tasks {
        rt.spawn(t);
    }
    Ok((app, rt))
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.interval < Duration::from_millis(100) {
        bail!("--interval must be at least 100ms");
    }
    let live = !args.once && std::io::stdout().is_terminal();
    // The agent's own log lines (slow syscalls, discovery) would tear the live view; in the
    // plain table only warnings are worth the noise.
    log::set_max_level(if live {
        log::LevelFilter::Off
    } else {
        log::LevelFilter::Warn
    });
    let (app, rt) = start_app()?;
    let filter = Filter {
        comm: args.comm.clone(),
        pid: args.pid,
        cgroup: args.cgroup.clone(),
    };
    let result = if !live {
        let (t0, _) = totals(&app.gather());
        let start = Instant::now();
        std::thread::sleep(args.interval);
        let (t1, names) = totals(&app.gather());
        let rows = sorted(rows(&t0, &t1, &names), args.sort, &filter);
        let table = plain_table(&rows, start.elapsed().as_secs_f64(), args.sort, args.rows);
        use std::io::Write;
        match std::io::stdout().lock().write_all(table.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            r => r.map_err(Into::into),
        }
    } else {
        tui(&app, args, filter)
    };
    drop(app);
    rt.shutdown_background();
    result
}

/// The live view. Keys: q quit, s next sort key, 1-7 sort key, / filter by comm (Enter
/// applies, Esc clears), p pause, ? help.
fn tui(app: &App, args: &Args, mut filter: Filter) -> anyhow::Result<()> {
    use crossterm::event::{self, Event, KeyCode, KeyEventKind};
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Modifier, Style};
    use ratatui::text::Line;
    use ratatui::widgets::{Cell, Paragraph, Row as TRow, Table};

    let failed: Vec<&str> = app
        .probes
        .iter()
        .filter(|p| p.result.is_err())
        .map(|p| p.name)
        .collect();
    let mut term = ratatui::init();
    let mut sort = args.sort;
    let mut paused = false;
    let mut editing: Option<String> = None;
    let mut help = false;
    let (mut prev, _) = totals(&app.gather());
    let mut last = Instant::now();
    let mut shown: Vec<Row> = Vec::new();
    let mut interval_s = args.interval.as_secs_f64();
    let outcome = loop {
        if last.elapsed() >= args.interval && !paused {
            let (now, names) = totals(&app.gather());
            interval_s = last.elapsed().as_secs_f64();
            shown = rows(&prev, &now, &names);
            prev = now;
            last = Instant::now();
        }
        let view = sorted(shown.clone(), sort, &filter);
        let draw = term.draw(|f| {
            let [title, table, keys] = Layout::vertical([
                Constraint::Length(1),
                Constraint::Min(1),
                Constraint::Length(1),
            ])
            .areas(f.area());
            let status = format!(
                "stallwatch top  sort:{}  filter:{}  interval:{:.1}s{}{}",
                sort.name(),
                filter.comm.as_deref().unwrap_or("-"),
                interval_s,
                if paused { "  PAUSED" } else { "" },
                if failed.is_empty() {
                    "  (us unless ms/s)".to_string()
                } else {
                    format!("  NOT ATTACHED: {}", failed.join(","))
                }
            );
            f.render_widget(Paragraph::new(status), title);
            let widths = WIDTHS.map(Constraint::Length);
            let rows = view
                .iter()
                .map(|r| TRow::new(cells(r, interval_s).map(Cell::from)));
            let header = TRow::new(HEADER.map(Cell::from))
                .style(Style::default().add_modifier(Modifier::REVERSED));
            f.render_widget(Table::new(rows, widths).header(header), table);
            let hint = match (&editing, help) {
                (Some(text), _) => format!("filter comm: {text}_  (Enter apply, Esc clear)"),
                (None, true) => {
                    "1-7 sort runq/wait/offcpu/io/syscall/tcp/pause s:next /:filter p q".into()
                }
                (None, false) => "q quit  s sort  / filter  p pause  ? help".into(),
            };
            f.render_widget(Paragraph::new(Line::from(hint)), keys);
        });
        if let Err(e) = draw {
            break Err(e.into());
        }
        let wait = if paused {
            Duration::from_millis(200)
        } else {
            args.interval
                .saturating_sub(last.elapsed())
                .clamp(Duration::from_millis(10), Duration::from_millis(200))
        };
        match event::poll(wait) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => break Err(e.into()),
        }
        let Ok(Event::Key(k)) = event::read() else {
            continue;
        };
        if k.kind != KeyEventKind::Press {
            continue;
        }
        if let Some(text) = editing.as_mut() {
            match k.code {
                KeyCode::Enter => {
                    filter.comm = (!text.is_empty()).then(|| text.clone());
                    editing = None;
                }
                KeyCode::Esc => {
                    filter.comm = None;
                    editing = None;
                }
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) => text.push(c),
                _ => {}
            }
            continue;
        }
        if k.code == KeyCode::Char('c') && k.modifiers.contains(event::KeyModifiers::CONTROL) {
            break Ok(());
        }
        match k.code {
            KeyCode::Char('q') => break Ok(()),
            // Esc clears a filter; with none set it quits, like q.
            KeyCode::Esc if filter.comm.is_some() => filter.comm = None,
            KeyCode::Esc => break Ok(()),
            KeyCode::Char('s') => sort = sort.next(),
            KeyCode::Char(c @ '1'..='7') => sort = Sort::ALL[c as usize - '1' as usize],
            KeyCode::Char('/') => editing = Some(String::new()),
            KeyCode::Char('p') => paused = !paused,
            KeyCode::Char('?') => help = !help,
            _ => {}
        }
    };
    ratatui::restore();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(counts: &[u64]) -> Hist {
        Hist {
            le: (0..counts.len() - 1)
                .map(|i| 1e-6 * (1 << i) as f64)
                .collect(),
            counts: counts.to_vec(),
            sum_seconds: 0.0,
        }
    }

    #[test]
    fn rows_sort_by_the_chosen_signal_and_filter() {
        let mk = |pid, comm: &str, runq: &[u64], off| Row {
            pid,
            comm: comm.into(),
            runq: hist(runq),
            offcpu_s: off,
            ..Row::default()
        };
        let rows = vec![
            mk(1, "idle", &[0, 0, 0], 0.0),
            mk(2, "sleepy", &[1, 0, 0], 0.9),
            mk(3, "starved", &[0, 0, 5], 0.0),
        ];
        let all = Filter {
            comm: None,
            pid: None,
            cgroup: None,
        };
        let by_runq: Vec<u32> = sorted(rows.clone(), Sort::Runq, &all)
            .iter()
            .map(|r| r.pid)
            .collect();
        assert_eq!(
            by_runq,
            vec![3, 2],
            "idle rows are hidden, the +Inf bucket sorts first"
        );
        let by_off: Vec<u32> = sorted(rows.clone(), Sort::Offcpu, &all)
            .iter()
            .map(|r| r.pid)
            .collect();
        assert_eq!(by_off, vec![2, 3]);
        let only = Filter {
            comm: Some("slee".into()),
            pid: None,
            cgroup: None,
        };
        assert_eq!(sorted(rows, Sort::Runq, &only).len(), 1);
    }

    #[test]
    fn the_plain_table_fits_80_columns() {
        let r = Row {
            pid: 4_194_304,
            comm: "a-very-long-command-name".into(),
            runq: hist(&[0, 3, 0]),
            top_class: "network".into(),
            ..Row::default()
        };
        let t = plain_table(&[r], 2.0, Sort::Runq, 10);
        for line in t.lines().skip(1) {
            assert!(
                line.chars().count() <= 80,
                "{line:?} is {} wide",
                line.len()
            );
        }
        assert!(t.contains("4194304"));
    }
}
