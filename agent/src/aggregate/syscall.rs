//! Syscall probe values and the syscall classification, both pure.
//!
//! Syscall numbers and names come from the `syscalls` crate's per-architecture tables
//! (generated from the kernel's own syscall tables); which class a syscall belongs to is
//! decided here, by name, so the same rules serve x86_64 and aarch64.

use std::collections::BTreeMap;

use stallwatch_common::hist::Hist;

use super::Counters;

/// A small, stable set of classes: what an SRE asks about, not the kernel's subsystems.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum Class {
    Read = 0,
    Write = 1,
    Poll = 2,
    Lock = 3,
    Sleep = 4,
    Socket = 5,
    File = 6,
    Memory = 7,
    Process = 8,
    Other = 9,
}

impl Class {
    pub const ALL: [Class; 10] = [
        Class::Read,
        Class::Write,
        Class::Poll,
        Class::Lock,
        Class::Sleep,
        Class::Socket,
        Class::File,
        Class::Memory,
        Class::Process,
        Class::Other,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Write => "write",
            Class::Poll => "poll",
            Class::Lock => "lock",
            Class::Sleep => "sleep",
            Class::Socket => "socket",
            Class::File => "file",
            Class::Memory => "memory",
            Class::Process => "process",
            Class::Other => "other",
        }
    }

    pub fn from_index(i: u32) -> Option<Class> {
        Class::ALL.get(i as usize).copied()
    }

    /// The class of a syscall, by its kernel name (as in the syscall tables, no `sys_`).
    pub fn of(name: &str) -> Class {
        match name {
            "read" | "readv" | "pread64" | "preadv" | "preadv2" | "readahead" | "sendfile"
            | "splice" | "tee" | "vmsplice" | "copy_file_range" | "io_getevents"
            | "io_pgetevents" | "io_uring_enter" => Class::Read,
            "write" | "writev" | "pwrite64" | "pwritev" | "pwritev2" | "io_submit" => Class::Write,
            "poll" | "ppoll" | "select" | "pselect6" | "epoll_wait" | "epoll_pwait"
            | "epoll_pwait2" | "epoll_create" | "epoll_create1" | "epoll_ctl" => Class::Poll,
            "futex" | "futex_waitv" | "futex_wait" | "futex_wake" | "futex_requeue"
            | "set_robust_list" | "get_robust_list" | "flock" => Class::Lock,
            "nanosleep" | "clock_nanosleep" | "pause" | "alarm" | "sched_yield" => Class::Sleep,
            "socket" | "socketpair" | "connect" | "accept" | "accept4" | "bind" | "listen"
            | "sendto" | "recvfrom" | "sendmsg" | "recvmsg" | "sendmmsg" | "recvmmsg"
            | "shutdown" | "getsockopt" | "setsockopt" | "getsockname" | "getpeername" => {
                Class::Socket
            }
            "mmap" | "munmap" | "mremap" | "mprotect" | "madvise" | "brk" | "msync" | "mlock"
            | "mlock2" | "munlock" | "mlockall" | "munlockall" | "mincore" | "process_madvise"
            | "process_mrelease" | "membarrier" | "userfaultfd" | "mbind" | "set_mempolicy"
            | "get_mempolicy" | "migrate_pages" | "move_pages" | "remap_file_pages"
            | "pkey_mprotect" | "memfd_create" | "memfd_secret" | "map_shadow_stack" | "mseal" => {
                Class::Memory
            }
            "clone" | "clone3" | "fork" | "vfork" | "execve" | "execveat" | "exit"
            | "exit_group" | "wait4" | "waitid" | "waitpid" | "kill" | "tkill" | "tgkill"
            | "getpid" | "getppid" | "gettid" | "setsid" | "getsid" | "setpgid" | "getpgid"
            | "getpgrp" | "prctl" | "arch_prctl" | "pidfd_open" | "pidfd_send_signal"
            | "pidfd_getfd" | "ptrace" | "unshare" | "setns" | "set_tid_address"
            | "rt_sigaction" | "rt_sigprocmask" | "rt_sigreturn" | "rt_sigsuspend"
            | "rt_sigtimedwait" | "rt_sigqueueinfo" | "rt_tgsigqueueinfo" | "rt_sigpending"
            | "sigaltstack" | "restart_syscall" => Class::Process,
            n if is_file(n) => Class::File,
            _ => Class::Other,
        }
    }
}

fn is_file(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "close",
        "close_range",
        "dup",
        "dup2",
        "dup3",
        "fcntl",
        "ioctl",
        "lseek",
        "fsync",
        "fdatasync",
        "sync",
        "syncfs",
        "sync_file_range",
        "truncate",
        "ftruncate",
        "fallocate",
        "rename",
        "renameat",
        "renameat2",
        "link",
        "linkat",
        "unlink",
        "unlinkat",
        "symlink",
        "symlinkat",
        "readlink",
        "readlinkat",
        "mkdir",
        "mkdirat",
        "rmdir",
        "mknod",
        "mknodat",
        "chdir",
        "fchdir",
        "getcwd",
        "access",
        "faccessat",
        "faccessat2",
        "getdents",
        "getdents64",
        "creat",
        "umask",
        "pipe",
        "pipe2",
        "eventfd",
        "eventfd2",
        "inotify_init",
        "inotify_init1",
        "inotify_add_watch",
        "inotify_rm_watch",
        "fanotify_init",
        "fanotify_mark",
        "name_to_handle_at",
        "open_by_handle_at",
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "utime",
        "utimes",
        "utimensat",
        "futimesat",
        "fadvise64",
        "signalfd",
        "signalfd4",
        "timerfd_create",
        "timerfd_settime",
        "timerfd_gettime",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "move_mount",
        "open_tree",
        "mount_setattr",
        "quotactl",
        "quotactl_fd",
        "cachestat",
    ];
    EXACT.contains(&name)
        || name.starts_with("open")
        || name.contains("stat")
        || name.starts_with("chown")
        || name.starts_with("fchown")
        || name.starts_with("lchown")
        || name.starts_with("chmod")
        || name.starts_with("fchmod")
        || name.contains("xattr")
}

/// One architecture's syscall table: number -> name.
pub struct Table {
    pub arch: &'static str,
    names: Vec<Option<&'static str>>,
}

macro_rules! table_of {
    ($arch:literal, $sysno:ty) => {{
        let mut names = Vec::new();
        for s in <$sysno>::iter() {
            let id = s.id() as usize;
            if names.len() <= id {
                names.resize(id + 1, None);
            }
            names[id] = Some(s.name());
        }
        Table { arch: $arch, names }
    }};
}

impl Table {
    pub fn x86_64() -> Table {
        table_of!("x86_64", syscalls::x86_64::Sysno)
    }

    pub fn aarch64() -> Table {
        table_of!("aarch64", syscalls::aarch64::Sysno)
    }

    /// The table of the architecture this agent runs on.
    pub fn host() -> anyhow::Result<Table> {
        match std::env::consts::ARCH {
            "x86_64" => Ok(Table::x86_64()),
            "aarch64" => Ok(Table::aarch64()),
            other => anyhow::bail!("no syscall table for architecture {other}"),
        }
    }

    pub fn name(&self, nr: u32) -> Option<&'static str> {
        self.names.get(nr as usize).copied().flatten()
    }

    /// Numbers below the table size: class index for each (the kernel's class map).
    pub fn class_indexes(&self, size: u32) -> Vec<u32> {
        (0..size)
            .map(|nr| match self.name(nr) {
                Some(n) => Class::of(n) as u32,
                None => Class::Other as u32,
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The errno's name (ENOENT), or its number for values the tables do not name.
pub fn errno_name(errno: u16) -> String {
    syscalls::Errno::new(i32::from(errno))
        .name()
        .map(str::to_string)
        .unwrap_or_else(|| format!("E{errno}"))
}

/// One process's syscall counters, keyed by slot (class index, or syscall number under
/// `--syscall-names`; `SLOT_UNKNOWN` for numbers outside the table).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SyscallStats {
    pub latency: BTreeMap<u32, Hist>,
    pub errors: BTreeMap<(u32, u16), u64>,
}

impl Counters for SyscallStats {
    fn activity(&self) -> u64 {
        self.latency.values().map(Hist::count).sum()
    }

    fn zero() -> Self {
        SyscallStats::default()
    }

    fn add(&mut self, other: &Self) {
        for (slot, h) in &other.latency {
            self.latency.entry(*slot).or_insert(Hist::ZERO).add(h);
        }
        for (k, n) in &other.errors {
            *self.errors.entry(*k).or_insert(0) += n;
        }
    }

    fn checked_sub(&self, earlier: &Self) -> Option<Self> {
        let mut out = self.clone();
        for (slot, h) in &earlier.latency {
            let now = out.latency.get_mut(slot)?;
            *now = now.checked_sub(h)?;
        }
        for (k, n) in &earlier.errors {
            let now = out.errors.get_mut(k)?;
            *now = now.checked_sub(*n)?;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_tables_load_and_classify_the_calls_the_tests_use() {
        for t in [Table::x86_64(), Table::aarch64()] {
            assert!(t.len() > 250, "{} table has {} entries", t.arch, t.len());
            assert!(
                t.len() <= stallwatch_common::syscall::SYSCALL_TABLE_SIZE as usize,
                "{} table outgrew the kernel class map",
                t.arch
            );
            let class_of = |name: &str| {
                let nr = (0..t.len() as u32)
                    .find(|nr| t.name(*nr) == Some(name))
                    .unwrap_or_else(|| panic!("{name} missing from the {} table", t.arch));
                Class::from_index(t.class_indexes(1024)[nr as usize]).unwrap()
            };
            assert_eq!(class_of("clock_nanosleep"), Class::Sleep);
            assert_eq!(class_of("nanosleep"), Class::Sleep);
            assert_eq!(class_of("futex"), Class::Lock);
            assert_eq!(class_of("read"), Class::Read);
            assert_eq!(class_of("write"), Class::Write);
            assert_eq!(class_of("getppid"), Class::Process);
            assert_eq!(class_of("openat"), Class::File);
            assert_eq!(class_of("fstat"), Class::File);
            assert_eq!(class_of("epoll_pwait"), Class::Poll);
            assert_eq!(class_of("ppoll"), Class::Poll);
            assert_eq!(class_of("connect"), Class::Socket);
            assert_eq!(class_of("mmap"), Class::Memory);
            assert_eq!(class_of("clone"), Class::Process);
            assert_eq!(class_of("fsync"), Class::File);
        }
        // Numbers differ per architecture; names do not.
        assert_eq!(Table::x86_64().name(39), Some("getpid"));
        assert_eq!(Table::aarch64().name(172), Some("getpid"));
    }

    #[test]
    fn every_class_is_reachable_and_labels_are_unique() {
        let t = Table::x86_64();
        let idx = t.class_indexes(1024);
        for c in Class::ALL {
            assert!(idx.contains(&(c as u32)), "no x86_64 syscall in {c:?}");
            assert_eq!(Class::from_index(c as u32), Some(c));
        }
        let mut labels: Vec<_> = Class::ALL.iter().map(|c| c.label()).collect();
        labels.dedup();
        assert_eq!(labels.len(), Class::ALL.len());
        assert_eq!(Class::from_index(10), None);
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(2), "ENOENT");
        assert_eq!(errno_name(110), "ETIMEDOUT");
        assert_eq!(errno_name(11), "EAGAIN");
        assert_eq!(errno_name(512), "ERESTARTSYS");
        assert_eq!(errno_name(4000), "E4000");
    }

    #[test]
    fn stats_subtract_and_detect_restarts() {
        let mut a = SyscallStats::default();
        let mut h = Hist::ZERO;
        h.observe(5_000);
        a.latency.insert(4, h);
        a.errors.insert((4, 2), 3);
        let mut b = a.clone();
        b.latency.get_mut(&4).unwrap().observe(7_000);
        b.latency.insert(1, h);
        b.errors.insert((4, 2), 5);
        let d = b.checked_sub(&a).unwrap();
        assert_eq!(d.latency[&4].count(), 1);
        assert_eq!(d.latency[&1].count(), 1);
        assert_eq!(d.errors[&(4, 2)], 2);
        // A slot that vanished, or a counter that shrank, is a recreated entry.
        assert!(a.checked_sub(&b).is_none());
        let mut c = b.clone();
        c.latency.remove(&1);
        assert!(c.checked_sub(&b).is_none());
        let mut sum = a.clone();
        sum.add(&d);
        assert_eq!(sum, b);
    }
}
