//! Workloads with a known ground truth, for stallwatch's kernel tests (not shipped).
//!
//! Every mode does its work, prints `done <tid> <tid>...` (the threads whose
//! /proc/<pid>/task/<tid>/schedstat the test should read), then keeps every thread alive,
//! blocked, until stdin closes — so the test can read /proc and scrape the agent while
//! nothing in the process moves.
//!
//!   swload sleep COUNT MS        COUNT nanosleeps of MS milliseconds on the main thread
//!   swload spin THREADS MS CPU   THREADS threads busy-loop for MS ms, all pinned to CPU
//!   swload threads WAVES PER COUNT MS  WAVES waves of PER threads that each make COUNT
//!                                nanosleeps of MS ms and end; then prints
//!                                `rusage NVCSW NIVCSW` (getrusage: ended threads included)
//!   swload idle-threads N        N threads that block until stdin closes
//!   swload thread-exec COUNT MS  the main thread and a second one each make COUNT nanosleeps
//!                                of MS ms; then the second one execs `swload threads 0 0 0 0`
//!                                (so the process goes on under the main thread's pid), which
//!                                makes COUNT more and prints `rusage` as above
//!   swload vfork MS              clone(CLONE_VFORK); the child sleeps MS ms and exits; the parent waits in D
//!   swload futex COUNT MS        COUNT FUTEX_WAITs that time out after MS ms (ETIMEDOUT)
//!   swload piperead MS           a blocking pipe read; another thread writes after MS ms
//!   swload getppid COUNT         COUNT getppid calls
//!   swload openmissing COUNT     COUNT open()s of a file that does not exist (ENOENT)
//!   swload tcp-serve ADDR COUNT MS   listen on ADDR (ip:port), print `listening`; with MS > 0
//!                                wait for a queued connection and leave it queued MS ms; then
//!                                accept COUNT connections and echo each until EOF
//!   swload tcp-connect ADDR COUNT  COUNT sequential connections: send a byte, read the echo, close
//!   swload tcp-try ADDR SYNCNT [refused|timeout|unreachable]
//!                                  one connect (TCP_SYNCNT=SYNCNT if > 0) that is expected to
//!                                  fail (with that error, if given)
//!   swload tcp-pingpong ADDR MS COUNT  one connection, COUNT echoes MS ms apart, kept open
//!
//! With SWLOAD_GATE=1 the workload first prints `ready`, then waits for SIGUSR1 (in
//! rt_sigtimedwait, a `process`-class syscall) before working, so a test can read the agent's
//! counters between the process's start-up and its work.

use std::io::{Read, Write};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!(
        "usage: swload sleep COUNT MS | spin THREADS MS CPU | threads WAVES PER COUNT MS | \
         idle-threads N | thread-exec COUNT MS | \
         vfork MS | futex COUNT MS | \
         piperead MS | getppid COUNT | openmissing COUNT | tcp-serve ADDR COUNT MS | \
         tcp-connect ADDR COUNT | tcp-try ADDR SYNCNT [refused|timeout|unreachable] | tcp-pingpong ADDR MS COUNT"
    );
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

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs() as _,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

/// The nanosleep syscall itself (glibc's wrapper issues clock_nanosleep), so tests know
/// which syscall to expect.
fn nanosleep(d: Duration) {
    let ts = timespec(d);
    // SAFETY: valid timespec; a signal interruption just shortens the sleep, which the
    // test would notice.
    unsafe {
        libc::syscall(
            libc::SYS_nanosleep,
            &ts,
            std::ptr::null_mut::<libc::timespec>(),
        )
    };
}

/// `count` nanosleeps of `ms` milliseconds.
fn sleeps(count: u32, ms: u64) {
    for _ in 0..count {
        nanosleep(Duration::from_millis(ms));
    }
}

/// SWLOAD_GATE=1: print `ready`, then wait for SIGUSR1.
fn gate() {
    if std::env::var_os("SWLOAD_GATE").is_none() {
        return;
    }
    // SAFETY: plain signal-mask calls on a zeroed, then initialised, sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        println!("ready");
        std::io::stdout().flush().ok();
        while libc::sigwaitinfo(&set, std::ptr::null_mut()) != libc::SIGUSR1 {}
    }
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
    gate();
    match args.get(1).map(String::as_str) {
        Some("sleep") => {
            let count: u32 = arg(&args, 2);
            let ms: u64 = arg(&args, 3);
            sleeps(count, ms);
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
        Some("threads") => {
            let waves: u32 = arg(&args, 2);
            let per: u32 = arg(&args, 3);
            let count: u32 = arg(&args, 4);
            let ms: u64 = arg(&args, 5);
            if let Some(count) = std::env::var("SWLOAD_SLEEPS")
                .ok()
                .and_then(|c| c.parse::<u32>().ok())
            {
                // After `thread-exec`: the main thread's sleeps, post-exec.
                let ms: u64 = std::env::var("SWLOAD_MS").unwrap().parse().unwrap();
                sleeps(count, ms);
            }
            for _ in 0..waves {
                let wave: Vec<_> = (0..per)
                    .map(|_| std::thread::spawn(move || sleeps(count, ms)))
                    .collect();
                for t in wave {
                    t.join().unwrap();
                }
            }
            // SAFETY: getrusage fills the zeroed struct.
            let ru = unsafe {
                let mut ru: libc::rusage = std::mem::zeroed();
                libc::getrusage(libc::RUSAGE_SELF, &mut ru);
                ru
            };
            println!("rusage {} {}", ru.ru_nvcsw, ru.ru_nivcsw);
            done_and_wait(&[gettid()]);
        }
        Some("idle-threads") => {
            let n: usize = arg(&args, 2);
            let release = Arc::new(Barrier::new(n + 1));
            let threads: Vec<_> = (0..n)
                .map(|_| {
                    let release = release.clone();
                    std::thread::spawn(move || {
                        release.wait();
                    })
                })
                .collect();
            done_and_wait(&[gettid()]);
            release.wait();
            for t in threads {
                t.join().unwrap();
            }
        }
        Some("thread-exec") => {
            let count: u32 = arg(&args, 2);
            let ms: u64 = arg(&args, 3);
            let t = std::thread::spawn(move || {
                sleeps(count, ms);
                use std::os::unix::process::CommandExt;
                let err = std::process::Command::new("/proc/self/exe")
                    .args(["threads", "0", "0", "0", "0"])
                    .env("SWLOAD_SLEEPS", count.to_string())
                    .env("SWLOAD_MS", ms.to_string())
                    .exec();
                eprintln!("swload: exec: {err}");
                std::process::exit(1);
            });
            sleeps(count, ms);
            // The exec ends this thread; it never returns.
            let _ = t.join();
            std::process::exit(1);
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
                    tv_sec: (ms / 1000) as _,
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
        Some("futex") => {
            let count: u32 = arg(&args, 2);
            let ms: u64 = arg(&args, 3);
            let word = std::sync::atomic::AtomicU32::new(0);
            let ts = timespec(Duration::from_millis(ms));
            for _ in 0..count {
                // SAFETY: FUTEX_WAIT on our own word, which stays 0: it times out.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_futex,
                        word.as_ptr(),
                        libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                        0u32,
                        &ts,
                    )
                };
                let err = std::io::Error::last_os_error().raw_os_error();
                if r != -1 || err != Some(libc::ETIMEDOUT) {
                    eprintln!("swload: futex wait did not time out: {r} {err:?}");
                    std::process::exit(1);
                }
            }
            done_and_wait(&[gettid()]);
        }
        Some("piperead") => {
            let ms: u64 = arg(&args, 2);
            let mut fds = [0; 2];
            // SAFETY: pipe fills two fds.
            if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
                eprintln!("swload: pipe: {}", std::io::Error::last_os_error());
                std::process::exit(1);
            }
            let writer = std::thread::spawn(move || {
                nanosleep(Duration::from_millis(ms));
                // SAFETY: writing one byte from a valid buffer to our pipe.
                unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) };
            });
            let mut b = [0u8; 1];
            // SAFETY: reading into a valid one-byte buffer.
            let n = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
            writer.join().unwrap();
            if n != 1 {
                eprintln!("swload: pipe read returned {n}");
                std::process::exit(1);
            }
            done_and_wait(&[gettid()]);
        }
        Some("getppid") => {
            let count: u32 = arg(&args, 2);
            for _ in 0..count {
                // SAFETY: no preconditions.
                std::hint::black_box(unsafe { libc::syscall(libc::SYS_getppid) });
            }
            done_and_wait(&[gettid()]);
        }
        Some("openmissing") => {
            let count: u32 = arg(&args, 2);
            let path = c"/nonexistent-stallwatch-test/file";
            for _ in 0..count {
                // SAFETY: a valid NUL-terminated path.
                let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
                if fd >= 0 {
                    eprintln!("swload: {path:?} exists");
                    std::process::exit(1);
                }
            }
            done_and_wait(&[gettid()]);
        }
        Some("tcp-serve") => {
            let addr: std::net::SocketAddr = arg(&args, 2);
            let count: usize = arg(&args, 3);
            let ms: u64 = arg(&args, 4);
            let listener = std::net::TcpListener::bind(addr).unwrap_or_else(|e| {
                eprintln!("swload: bind {addr}: {e}");
                std::process::exit(1)
            });
            println!("listening");
            std::io::stdout().flush().ok();
            if ms > 0 {
                // Wait until a connection is in the accept queue, then leave it there MS ms.
                use std::os::fd::AsRawFd;
                let mut pfd = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, -1) };
                nanosleep(Duration::from_millis(ms));
            }
            let mut handlers = Vec::new();
            for _ in 0..count {
                let (conn, _) = listener.accept().expect("accept");
                handlers.push(std::thread::spawn(move || echo(conn)));
                // Finished handlers are joined as we go, so 10,000 connections do not
                // mean 10,000 threads.
                handlers.retain(|h| !h.is_finished());
            }
            for h in handlers {
                h.join().unwrap();
            }
            done_and_wait(&[gettid()]);
        }
        Some("tcp-connect") => {
            let addr: std::net::SocketAddr = arg(&args, 2);
            let count: usize = arg(&args, 3);
            for _ in 0..count {
                let mut c = std::net::TcpStream::connect(addr).unwrap_or_else(|e| {
                    eprintln!("swload: connect {addr}: {e}");
                    std::process::exit(1)
                });
                c.write_all(b"x").expect("send");
                let mut b = [0u8; 1];
                c.read_exact(&mut b).expect("echo");
            }
            done_and_wait(&[gettid()]);
        }
        Some("tcp-try") => {
            let addr: std::net::SocketAddr = arg(&args, 2);
            let syncnt: i32 = arg(&args, 3);
            // Optional: the failure the test is built on, so a different one (e.g. an
            // unreachable where a timeout was meant) fails the workload, not the agent.
            let expect = match args.get(4).map(String::as_str) {
                None => None,
                Some("refused") => Some(libc::ECONNREFUSED),
                Some("timeout") => Some(libc::ETIMEDOUT),
                Some("unreachable") => Some(libc::EHOSTUNREACH),
                Some(_) => usage(),
            };
            match connect_with_syncnt(addr, syncnt) {
                Ok(()) => {
                    eprintln!("swload: connect {addr} succeeded, expected a failure");
                    std::process::exit(1);
                }
                Err(e) if expect.is_some_and(|want| e.raw_os_error() != Some(want)) => {
                    eprintln!("swload: connect {addr}: {e}, expected {}", args[4]);
                    std::process::exit(1);
                }
                Err(e) => eprintln!("swload: connect {addr}: {e} (expected)"),
            }
            done_and_wait(&[gettid()]);
        }
        Some("tcp-pingpong") => {
            let addr: std::net::SocketAddr = arg(&args, 2);
            let ms: u64 = arg(&args, 3);
            let count: usize = arg(&args, 4);
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            let mut b = [0u8; 1];
            for _ in 0..count {
                c.write_all(b"x").expect("send");
                c.read_exact(&mut b).expect("echo");
                nanosleep(Duration::from_millis(ms));
            }
            // Keep the connection open (for `ss`) until stdin closes.
            done_and_wait(&[gettid()]);
            drop(c);
        }
        _ => usage(),
    }
}

fn echo(mut conn: std::net::TcpStream) {
    let mut buf = [0u8; 512];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// A blocking connect with TCP_SYNCNT set (how many SYN retransmits before giving up).
fn connect_with_syncnt(addr: std::net::SocketAddr, syncnt: i32) -> std::io::Result<()> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on an fd we own; the sockaddr structs are initialised
    // and their lengths passed.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if syncnt > 0 {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_SYNCNT,
                (&syncnt as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
        }
        let r = match addr {
            std::net::SocketAddr::V4(a) => {
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                libc::connect(
                    fd,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
            std::net::SocketAddr::V6(a) => {
                let sa = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                libc::connect(
                    fd,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        };
        let result = if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
        libc::close(fd);
        result
    }
}
