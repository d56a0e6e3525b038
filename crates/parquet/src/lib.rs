//! Parquet and Arrow forms of moe-xray's data: routing traces (single files and Hive-partitioned
//! datasets, `run=/category=/part-N.parquet`) and the analysis tables. Built on the `arrow` and
//! `parquet` crates; nothing here is a hand-written columnar format.
#![forbid(unsafe_code)]

pub mod error;

pub use error::{Error, Result};
