//! Whole-map reads of BPF hash maps with the kernel's batch commands, which aya does not wrap.
//!
//! `BPF_MAP_LOOKUP_BATCH` walks a hash map bucket by bucket, many entries per syscall, and its
//! cursor is a bucket index: entries the programs delete meanwhile neither restart the walk
//! nor repeat it (a `get_next_key` walk restarts from the first entry when its key goes).
//! `BPF_MAP_LOOKUP_AND_DELETE_BATCH` also deletes what it returns, in the same bucket lock.
//! Both exist for hash maps since v5.6; where they fail, the read falls back to a key-by-key
//! walk.

use std::collections::HashMap as StdHashMap;
use std::hash::Hash;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{HashMap, IterableMap, MapData};
use aya::Pod;

use super::bpf_sys::{bpf_cmd, sys_bpf, zeroed_attr};

/// Entries per syscall to start with; doubled if one bucket holds more.
const CHUNK: usize = 256;

/// A whole-map read: keys and values side by side, each entry once, and how many entries
/// could not be read (they vanished mid-walk, or the batch command failed).
pub struct Entries<K, V> {
    pub keys: Vec<K>,
    pub values: Vec<V>,
    pub failed: u64,
}

/// Every entry of hash map `name`; with `delete`, each one returned is deleted. `expected`:
/// about how many entries there are, to size the buffers once; `bound`: its capacity, which
/// bounds a fallback walk.
pub fn hash_entries<K: Pod + Eq + Hash, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &str,
    delete: bool,
    expected: usize,
    bound: usize,
) -> Entries<K, V> {
    let (mut keys, mut values, error) = batch(map, delete, expected);
    let mut failed = 0;
    if let Some(e) = error {
        log::warn!("batch read of {name}: {e}; reading it key by key");
        failed += 1;
        if delete {
            // What the batch returned is deleted already: keep it, walk the rest.
            for key in walk_keys(map, bound, &mut failed) {
                let Ok(v) = map.get(&key, 0) else {
                    failed += 1;
                    continue;
                };
                // Taken only once deleted, so a failure leaves it for the next read, not
                // returned twice.
                if map.remove(&key).is_err() {
                    failed += 1;
                    continue;
                }
                keys.push(key);
                values.push(v);
            }
        } else {
            // The walk (get_next_key from the last key) starts over when the programs delete
            // the key it stands on, returning entries again: the last copy of a key wins.
            // Bounded, in case entries keep going under it.
            let mut all = StdHashMap::new();
            for item in map.iter().take(bound.saturating_mul(4)) {
                match item {
                    Ok((k, v)) => {
                        all.insert(k, v);
                    }
                    Err(_) => failed += 1,
                }
            }
            (keys, values) = all.into_iter().unzip();
        }
    }
    Entries {
        keys,
        values,
        failed,
    }
}

/// The map's keys, by a get_next_key walk of at most `bound` steps.
fn walk_keys<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    bound: usize,
    failed: &mut u64,
) -> Vec<K> {
    let mut keys = Vec::new();
    for key in map.keys().take(bound) {
        match key {
            Ok(k) => keys.push(k),
            Err(_) => *failed += 1,
        }
    }
    keys
}

/// Every entry, with the batch commands: keys, values, and the error that ended the walk
/// early, if one did. Entries before an error are valid (and, when deleting, deleted: the
/// caller must keep them). The map's type (aya checked its key and value sizes against `K`
/// and `V` when it was taken) bounds what the kernel writes.
fn batch<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    delete: bool,
    expected: usize,
) -> (Vec<K>, Vec<V>, Option<io::Error>) {
    let fd = map.map().fd().as_fd().as_raw_fd();
    let cmd = if delete {
        bpf_cmd::BPF_MAP_LOOKUP_AND_DELETE_BATCH
    } else {
        bpf_cmd::BPF_MAP_LOOKUP_BATCH
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
        let mut attr = zeroed_attr();
        attr.batch.in_batch = if first {
            0
        } else {
            std::ptr::addr_of!(cursor) as u64
        };
        attr.batch.out_batch = std::ptr::addr_of_mut!(next) as u64;
        // Straight into the vectors' spare room: no copy after the kernel's.
        attr.batch.keys = keys.spare_capacity_mut().as_mut_ptr() as u64;
        attr.batch.values = values.spare_capacity_mut().as_mut_ptr() as u64;
        attr.batch.count = chunk as u32;
        attr.batch.map_fd = fd as u32;
        // SAFETY: the kernel writes at most `count` keys and values of the map's key and
        // value sizes (those of `K` and `V`, which aya checked) into spare room reserved for
        // `chunk` of each, and a u32 bucket index into `next`.
        let error = unsafe { sys_bpf(cmd, &mut attr) }.err();
        // On success, or on an error after some buckets were copied (the kernel then writes
        // back how many: fewer than asked), `count` entries are valid. An error before the
        // walk began leaves `count` as we set it.
        // SAFETY: `batch` is the member set above and written back by the kernel.
        let n = unsafe { attr.batch.count } as usize;
        let n = if error.is_none() || n < chunk { n } else { 0 };
        // SAFETY: the kernel initialised the first `n` elements of the spare room.
        unsafe {
            keys.set_len(keys.len() + n);
            values.set_len(values.len() + n);
        }
        match error.as_ref().and_then(io::Error::raw_os_error) {
            None => {}
            // The walk reached the end.
            Some(libc::ENOENT) => return (keys, values, None),
            // A bucket holds more entries than fit: retry it with more room.
            Some(libc::ENOSPC) if n == 0 && chunk < (1 << 20) => {
                chunk *= 2;
                continue;
            }
            Some(_) => return (keys, values, error),
        }
        cursor = next;
        first = false;
    }
}
