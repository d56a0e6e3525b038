//! Parquet and Arrow forms of moe-xray's data: routing traces (single files and Hive-partitioned
//! datasets, `run=/category=/part-N.parquet`) and the analysis tables. Built on the `arrow` and
//! `parquet` crates; nothing here is a hand-written columnar format.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod dataset;
pub mod error;
pub mod tables;
pub mod trace_io;

pub use error::{Error, Result};
