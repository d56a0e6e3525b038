//! Routing-trace data model and I/O for moe-xray.
//!
//! This crate has no tensor dependencies: the model crate emits [`RoutingDecision`]s into a
//! [`RoutingSink`], and everything downstream (capture files, statistics) consumes the types here.

pub mod error;
pub mod record;
pub mod sink;

pub use error::{Result, TraceError};
pub use record::{RoutingRecord, TokenType};
pub use sink::{RoutingDecision, RoutingSink};
