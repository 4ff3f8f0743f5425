//! Pure aggregation: kernel snapshots in, monotonic per-series values out. No aya, no prometheus.

pub mod budget;
pub mod process;
pub mod syscall;

pub use budget::Budget;
pub use process::{Counters, Identity, Owner, ProcessAggregator, SeriesKey};
