//! stallwatch's agent as a library: the binary (`src/main.rs`) is its command line, and the
//! fuzz targets (`fuzz/`) reach the parsers of untrusted input through it.

pub mod aggregate;
pub mod app;
pub mod attribution;
pub mod btf;
pub mod check;
pub mod config;
pub mod diagnose;
pub mod embedded;
pub mod loader;
pub mod metrics;
pub mod privileges;
pub mod probes;
pub mod procfs;
pub mod runtime;
pub mod server;
pub mod top;
