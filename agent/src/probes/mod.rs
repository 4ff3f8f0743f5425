//! One module per probe: it owns its programs and maps and returns plain snapshots.

pub mod sched;
