//! `BPF_MAP_TYPE_TASK_STORAGE`, which aya-ebpf does not wrap: per-task values that the kernel
//! finds through the task itself (no hashing) and frees with the task.
//!
//! A BTF map definition (`.maps`): the kernel requires BTF key/value types for local storage.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{
        bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE, task_struct, BPF_F_NO_PREALLOC,
        BPF_LOCAL_STORAGE_GET_F_CREATE,
    },
    helpers::generated::{bpf_task_storage_delete, bpf_task_storage_get},
};

#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: placeholder pointers patched by the loader, never dereferenced from Rust.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        TaskStorage {
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

    /// The task's value, if it has one. `task` must be a BTF task pointer (a tp_btf argument).
    #[inline(always)]
    pub fn get(&self, task: *const u8) -> Option<*mut T> {
        let p = unsafe {
            bpf_task_storage_get(self.as_ptr(), task as *mut task_struct, ptr::null_mut(), 0)
        };
        (!p.is_null()).then_some(p.cast())
    }

    /// The task's value, created zeroed if absent. `None` if the kernel could not allocate it
    /// (or refused a recursive access).
    #[inline(always)]
    pub fn get_or_create(&self, task: *const u8) -> Option<*mut T> {
        let p = unsafe {
            bpf_task_storage_get(
                self.as_ptr(),
                task as *mut task_struct,
                ptr::null_mut(),
                u64::from(BPF_LOCAL_STORAGE_GET_F_CREATE),
            )
        };
        (!p.is_null()).then_some(p.cast())
    }

    #[inline(always)]
    pub fn delete(&self, task: *const u8) -> bool {
        unsafe { bpf_task_storage_delete(self.as_ptr(), task as *mut task_struct) == 0 }
    }
}
