//! Whole-map reads of BPF hash maps with the kernel's batch commands, which aya does not wrap.
//!
//! `BPF_MAP_LOOKUP_BATCH` walks a hash map bucket by bucket, many entries per syscall, and its
//! cursor is a bucket index: entries the programs delete meanwhile neither restart the walk
//! nor repeat it (a `get_next_key` walk restarts from the first entry when its key goes).
//! `BPF_MAP_LOOKUP_AND_DELETE_BATCH` also deletes what it returns, in the same bucket lock.
//! Both exist for hash maps since v5.6.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{HashMap, IterableMap, MapData};
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

/// What a batch read returned: keys and values side by side, and the error that ended it
/// early, if one did. Entries before an error are valid (and, when deleting, deleted: the
/// caller must keep them).
pub struct Entries<K, V> {
    pub keys: Vec<K>,
    pub values: Vec<V>,
    pub error: Option<io::Error>,
}

/// Every entry of a hash map; with `delete`, each one returned is deleted. `expected`: about
/// how many entries there are, to size the buffers once. The map's type (aya checked its key
/// and value sizes against `K` and `V` when it was taken) bounds what the kernel writes.
pub fn hash_entries<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    delete: bool,
    expected: usize,
) -> Entries<K, V> {
    let fd = map.map().fd().as_fd().as_raw_fd();
    let cmd = if delete {
        BPF_MAP_LOOKUP_AND_DELETE_BATCH
    } else {
        BPF_MAP_LOOKUP_BATCH
    };
    let mut keys: Vec<K> = Vec::with_capacity(expected + CHUNK);
    let mut values: Vec<V> = Vec::with_capacity(expected + CHUNK);
    let mut chunk = CHUNK;
    // The hash map's cursor: a bucket index.
    let (mut cursor, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        keys.reserve(chunk);
        values.reserve(chunk);
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::addr_of!(cursor) as u64
            },
            out_batch: std::ptr::addr_of_mut!(next) as u64,
            // Straight into the vectors' spare room: no copy after the kernel's.
            keys: keys.spare_capacity_mut().as_mut_ptr() as u64,
            values: values.spare_capacity_mut().as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid bpf_attr prefix of the size passed. The kernel writes at
        // most `count` keys and values of the map's key and value sizes (those of `K` and
        // `V`, which aya checked) into spare room reserved for `chunk` of each, and a u32
        // bucket index into `next`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::addr_of_mut!(attr),
                size_of::<BatchAttr>(),
            )
        };
        let error = (r < 0).then(io::Error::last_os_error);
        // On success, or on an error after some buckets were copied (the kernel then writes
        // back how many: fewer than asked), `count` entries are valid. An error before the
        // walk began leaves `count` as we set it.
        let n = attr.count as usize;
        let n = if error.is_none() || n < chunk { n } else { 0 };
        // SAFETY: the kernel initialised the first `n` elements of the spare room.
        unsafe {
            keys.set_len(keys.len() + n);
            values.set_len(values.len() + n);
        }
        match error.as_ref().and_then(io::Error::raw_os_error) {
            None => {}
            // The walk reached the end.
            Some(libc::ENOENT) => {
                return Entries {
                    keys,
                    values,
                    error: None,
                }
            }
            // A bucket holds more entries than fit: retry it with more room.
            Some(libc::ENOSPC) if n == 0 && chunk < (1 << 20) => {
                chunk *= 2;
                continue;
            }
            Some(_) => {
                return Entries {
                    keys,
                    values,
                    error,
                }
            }
        }
        cursor = next;
        first = false;
    }
}
