//! Workloads with a known ground truth, for stallwatch's kernel tests (not shipped).
//!
//! Every mode does its work, prints `done <tid> <tid>...` (the threads whose
//! /proc/<pid>/task/<tid>/schedstat the test should read), then keeps every thread alive,
//! blocked, until stdin closes — so the test can read /proc and scrape the agent while
//! nothing in the process moves.
//!
//!   swload sleep COUNT MS        COUNT nanosleeps of MS milliseconds on the main thread
//!   swload spin THREADS MS CPU   THREADS threads busy-loop for MS ms, all pinned to CPU
//!   swload vfork MS              clone(CLONE_VFORK); the child sleeps MS ms and exits; the parent waits in D

use std::io::{Read, Write};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!("usage: swload sleep COUNT MS | spin THREADS MS CPU | vfork MS");
    std::process::exit(2);
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| usage())
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET indexes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!(
                "swload: sched_setaffinity({cpu}): {}",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
    }
}

fn nanosleep(d: Duration) {
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid timespec; a signal interruption just shortens the sleep, which the
    // test would notice.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

fn done_and_wait(tids: &[i32]) {
    let list: Vec<String> = tids.iter().map(|t| t.to_string()).collect();
    println!("done {}", list.join(" "));
    std::io::stdout().flush().ok();
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink).ok();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("sleep") => {
            let count: u32 = arg(&args, 2);
            let ms: u64 = arg(&args, 3);
            for _ in 0..count {
                nanosleep(Duration::from_millis(ms));
            }
            done_and_wait(&[gettid()]);
        }
        Some("spin") => {
            let threads: usize = arg(&args, 2);
            let ms: u64 = arg(&args, 3);
            let cpu: usize = arg(&args, 4);
            let start = Arc::new(Barrier::new(threads + 1));
            let finished = Arc::new(Barrier::new(threads + 1));
            let release = Arc::new(Barrier::new(threads + 1));
            let (tx, rx) = std::sync::mpsc::channel();
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (start, finished, release, tx) =
                        (start.clone(), finished.clone(), release.clone(), tx.clone());
                    std::thread::spawn(move || {
                        pin_to(cpu);
                        tx.send(gettid()).unwrap();
                        start.wait();
                        let t0 = Instant::now();
                        let mut x = 0u64;
                        while t0.elapsed() < Duration::from_millis(ms) {
                            x = std::hint::black_box(
                                x.wrapping_mul(6364136223846793005).wrapping_add(1),
                            );
                        }
                        finished.wait();
                        release.wait();
                    })
                })
                .collect();
            let mut tids: Vec<i32> = (0..threads).map(|_| rx.recv().unwrap()).collect();
            start.wait();
            finished.wait();
            tids.push(gettid());
            done_and_wait(&tids);
            release.wait();
            for h in handles {
                h.join().unwrap();
            }
        }
        Some("vfork") => {
            let ms: u64 = arg(&args, 2);
            // clone(CLONE_VFORK) without CLONE_VM: the parent waits in D state exactly as
            // after vfork() (wait_for_vfork_done), but the child has its own copy of memory,
            // so Rust's returns-twice hazard of vfork() does not apply.
            // SAFETY: raw clone with no stack/tls arguments behaves like fork.
            let pid = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (libc::CLONE_VFORK | libc::SIGCHLD) as libc::c_ulong,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                )
            } as libc::pid_t;
            if pid == 0 {
                let ts = libc::timespec {
                    tv_sec: (ms / 1000) as libc::time_t,
                    tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
                };
                unsafe {
                    libc::nanosleep(&ts, std::ptr::null_mut());
                    libc::_exit(0);
                }
            }
            if pid < 0 {
                eprintln!("swload: vfork: {}", std::io::Error::last_os_error());
                std::process::exit(1);
            }
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            done_and_wait(&[gettid()]);
        }
        _ => usage(),
    }
}
