//! Whole-map reads of BPF hash maps with the kernel's batch commands, which aya does not wrap.
//!
//! `BPF_MAP_LOOKUP_BATCH` walks a hash map bucket by bucket, many entries per syscall, and its
//! cursor is a bucket index: entries the programs delete meanwhile neither restart the walk
//! nor repeat it (a `get_next_key` walk restarts from the first entry when its key goes).
//! `BPF_MAP_LOOKUP_AND_DELETE_BATCH` also deletes what it returns, in the same bucket lock.
//! Both exist for hash maps since v5.6.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd};

use aya::maps::MapData;
use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries per syscall to start with; doubled if one bucket holds more.
const CHUNK: usize = 256;

/// Every entry of a (non-per-CPU) hash map; with `delete`, each one returned is deleted.
pub fn hash_entries<K: Pod, V: Pod>(map: &MapData, delete: bool) -> io::Result<Vec<(K, V)>> {
    let fd = map.fd().as_fd().as_raw_fd();
    let cmd = if delete {
        BPF_MAP_LOOKUP_AND_DELETE_BATCH
    } else {
        BPF_MAP_LOOKUP_BATCH
    };
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    let mut keys: Vec<MaybeUninit<K>> = Vec::new();
    let mut values: Vec<MaybeUninit<V>> = Vec::new();
    // The hash map's cursor: a bucket index.
    let (mut cursor, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        keys.resize_with(chunk, MaybeUninit::uninit);
        values.resize_with(chunk, MaybeUninit::uninit);
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::addr_of!(cursor) as u64
            },
            out_batch: std::ptr::addr_of_mut!(next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; the kernel writes at
        // most `count` keys and values into buffers that hold `chunk` of each, and a u32
        // cursor into `next`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::addr_of_mut!(attr),
                size_of::<BatchAttr>(),
            )
        };
        let err = (r < 0).then(io::Error::last_os_error);
        let n = (attr.count as usize).min(chunk);
        for i in 0..n {
            // SAFETY: the kernel filled the first `n` keys and values.
            out.push(unsafe { (keys[i].assume_init(), values[i].assume_init()) });
        }
        match err.as_ref().and_then(io::Error::raw_os_error) {
            None => {}
            // The walk reached the end.
            Some(libc::ENOENT) => return Ok(out),
            // A bucket holds more entries than fit: retry it with more room.
            Some(libc::ENOSPC) if n == 0 && chunk < (1 << 20) => {
                chunk *= 2;
                continue;
            }
            Some(_) => return Err(err.expect("an error")),
        }
        cursor = next;
        first = false;
    }
}
