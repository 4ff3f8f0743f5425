//! Local storage maps, which aya-ebpf does not wrap: per-task (`BPF_MAP_TYPE_TASK_STORAGE`)
//! and per-socket (`BPF_MAP_TYPE_SK_STORAGE`) values that the kernel finds through the object
//! itself (no hashing) and frees with it.
//!
//! BTF map definitions (`.maps`): the kernel requires BTF key/value types for local storage.
//! The map type and flags are encoded, libbpf-style, as the lengths of pointed-to arrays.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{
        bpf_map_type::{BPF_MAP_TYPE_SK_STORAGE, BPF_MAP_TYPE_TASK_STORAGE},
        task_struct, BPF_F_CLONE, BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE,
    },
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get, bpf_task_storage_get},
};

#[repr(C)]
pub struct LocalStorage<T, const TYPE: usize, const FLAGS: usize> {
    r#type: *const [i32; TYPE],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; FLAGS],
}

// SAFETY: placeholder pointers patched by the loader, never dereferenced from Rust.
unsafe impl<T, const A: usize, const B: usize> Sync for LocalStorage<T, A, B> {}

impl<T, const A: usize, const B: usize> LocalStorage<T, A, B> {
    pub const fn new() -> Self {
        LocalStorage {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        }
    }

    #[inline(always)]
    fn as_ptr(&self) -> *mut c_void {
        ptr::from_ref(self).cast_mut().cast()
    }
}

const TASK: usize = BPF_MAP_TYPE_TASK_STORAGE as usize;
const SK: usize = BPF_MAP_TYPE_SK_STORAGE as usize;
const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;
/// Children a listener's `accept` produces get a copy of its value.
const NO_PREALLOC_CLONE: usize = (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize;

/// Per-task values.
pub type TaskStorage<T> = LocalStorage<T, TASK, NO_PREALLOC>;
/// Per-socket values, cloned from a listening socket into the sockets it creates.
pub type SkStorage<T> = LocalStorage<T, SK, NO_PREALLOC_CLONE>;

const CREATE: u64 = BPF_LOCAL_STORAGE_GET_F_CREATE as u64;

impl<T> LocalStorage<T, TASK, NO_PREALLOC> {
    #[inline(always)]
    fn task_get(&self, task: *const u8, flags: u64) -> Option<*mut T> {
        let p = unsafe {
            bpf_task_storage_get(
                self.as_ptr(),
                task as *mut task_struct,
                ptr::null_mut(),
                flags,
            )
        };
        (!p.is_null()).then_some(p.cast())
    }

    /// The task's value, if it has one. `task` must be a BTF task pointer (a tp_btf argument,
    /// or `bpf_get_current_task_btf`).
    #[inline(always)]
    pub fn get(&self, task: *const u8) -> Option<*mut T> {
        self.task_get(task, 0)
    }

    /// The task's value, created zeroed if absent. `None` if the kernel could not allocate it
    /// (or refused a recursive access).
    #[inline(always)]
    pub fn get_or_create(&self, task: *const u8) -> Option<*mut T> {
        self.task_get(task, CREATE)
    }
}

impl<T> LocalStorage<T, SK, NO_PREALLOC_CLONE> {
    #[inline(always)]
    fn sk_get(&self, sk: *const u8, flags: u64) -> Option<*mut T> {
        let p =
            unsafe { bpf_sk_storage_get(self.as_ptr(), sk as *mut c_void, ptr::null_mut(), flags) };
        (!p.is_null()).then_some(p.cast())
    }

    /// The socket's value, if it has one. `sk` must be a BTF `struct sock` pointer.
    #[inline(always)]
    pub fn get(&self, sk: *const u8) -> Option<*mut T> {
        self.sk_get(sk, 0)
    }

    #[inline(always)]
    pub fn get_or_create(&self, sk: *const u8) -> Option<*mut T> {
        self.sk_get(sk, CREATE)
    }

    #[inline(always)]
    pub fn delete(&self, sk: *const u8) -> bool {
        unsafe { bpf_sk_storage_delete(self.as_ptr(), sk as *mut c_void) == 0 }
    }
}
