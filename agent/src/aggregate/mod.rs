//! Pure aggregation: kernel snapshots in, label-keyed series out. No aya, no prometheus.

pub mod sched;
