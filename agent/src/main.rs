//! stallwatch: where a process's time goes when it is not doing useful work.

use stallwatch::{app, attribution, check, config, diagnose, privileges, runtime, server, top};

use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "stallwatch",
    version,
    about = "eBPF agent: run-queue waits, off-CPU time and other stalls, per process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Prometheus exporter.
    Run(config::Flags),
    /// Load and attach every probe, report kernel, BTF, tracefs and capabilities; exit 1 naming what is missing.
    Check(config::Flags),
    /// Processes ranked by a stall signal, live (or one plain table with --once).
    Top(top::Args),
    /// Sample one process (or comm, or cgroup) and report where its time went, with a verdict.
    Diagnose(diagnose::Args),
    /// Show the language runtime in a binary or process and where the gc probe attaches to it
    /// (file offsets); says why when it cannot. Reading a file needs no privileges.
    Runtime(runtime::cli::Args),
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (flags, STALLWATCH_* variables, file, defaults) as TOML.
    Dump(config::Flags),
}

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(flags) => flags.resolve().and_then(run),
        Command::Check(flags) => flags.resolve().map(|c| {
            if !check::run(c) {
                std::process::exit(1);
            }
        }),
        Command::Top(args) => top::run(&args),
        Command::Diagnose(args) => diagnose::run(&args).and_then(|report| emit(&report)),
        Command::Runtime(args) => runtime::cli::run(&args).and_then(|report| emit(&report)),
        Command::Config {
            command: ConfigCommand::Dump(flags),
        } => flags.resolve().map(|c| print!("{}", c.to_toml())),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stallwatch: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes a report to stdout; a reader that went away (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn run(config: config::Config) -> anyhow::Result<()> {
    // One malloc arena, set before any thread starts. With one per thread, what a burst of
    // processes or a large scrape freed stays spread over arenas that cannot be trimmed:
    // measured (by hand, when this was set) over four rounds of 10,000 processes, RSS settled
    // at 133 MB with per-thread arenas and at 16 MB with one; BENCHMARKS.md tracks the RSS
    // with one. The agent is not allocation-bound.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt before threads exist; M_ARENA_MAX is a plain tunable.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(config))
}

async fn serve(config: config::Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let (mut app, mut tasks) = app::App::start(config)?;
    for p in &app.probes {
        match &p.result {
            Ok(progs) => log::info!("probe {} attached: {}", p.name, progs.join(", ")),
            Err(e) => log::warn!("probe {} not attached: {e}", p.name),
        }
    }
    if let Some(watch) = attribution::kube::start(&app.config).await {
        tasks.push(watch);
        app.kubernetes = true;
    }
    let app = Arc::new(app);
    let registry = prometheus::Registry::new();
    registry
        .register(Box::new(app::AppCollector::new(app.clone())))
        .context("registering the collector")?;
    // The agent's own CPU, memory, fds and threads (process_*), for its health dashboard.
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .context("registering the process collector")?;
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding --listen {listen}"))?;
    // After binding (a port below 1024 needs CAP_NET_BIND_SERVICE), before serving.
    if app.config.drop_capabilities {
        let keep = privileges::keep_set(&app.config);
        for (cap, why) in &keep {
            log::debug!("keeping {cap}: {why}");
        }
        let keep: Vec<_> = keep.into_iter().map(|(c, _)| c).collect();
        match privileges::drop_to(&keep) {
            Ok(d) => log::info!(
                "capabilities: kept {:?}, dropped {} in {} threads{}",
                d.kept,
                d.dropped.len(),
                d.threads,
                if d.bounding_set_too {
                    " (and from the bounding set)"
                } else {
                    ""
                }
            ),
            Err(e) => log::warn!("capabilities not dropped: {e:#}"),
        }
    }
    log::info!("listening on {}", listener.local_addr()?);
    let mut background = tokio::task::JoinSet::new();
    for t in tasks {
        background.spawn(t);
    }
    background.spawn(release_freed_memory());
    let server = axum::serve(listener, server::router(app.clone(), registry))
        .with_graceful_shutdown(shutdown);
    tokio::select! {
        r = server => r.context("HTTP server")?,
        Some(r) = background.join_next() => {
            r.context("background task panicked")?.context("background task failed")?;
        }
    }
    log::info!("shutting down; detaching probes");
    Ok(())
}

/// Hands memory the agent freed back to the kernel every 10 s. glibc's allocator keeps freed
/// heap pages (a burst of short-lived processes, or one large scrape, would otherwise leave
/// the agent's RSS at its peak for good); musl's returns them by itself.
async fn release_freed_memory() -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        #[cfg(target_env = "gnu")]
        tokio::task::spawn_blocking(|| {
            // SAFETY: malloc_trim only walks and trims the allocator's own heaps.
            unsafe { libc::malloc_trim(0) };
        })
        .await
        .map_err(|e| anyhow::anyhow!("malloc_trim task: {e}"))?;
    }
}

/// Waits for SIGTERM or SIGINT. The handlers are installed when this is called, not when
/// the future is first polled: the HTTP server polls its shutdown future from a task of its
/// own, possibly after it has answered its first request, and a signal in between would meet
/// the default action and kill the agent uncleanly.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}
