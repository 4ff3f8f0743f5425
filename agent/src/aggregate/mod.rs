//! Pure aggregation: kernel snapshots in, monotonic per-series values out. No aya, no prometheus.

pub mod process;
pub mod syscall;

pub use process::{Counters, Identity, ProcessAggregator, SeriesKey};
