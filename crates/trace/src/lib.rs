//! Routing-trace data model and I/O for moe-xray.
//!
//! This crate has no tensor dependencies: the model crate emits [`RoutingDecision`]s into a
//! [`RoutingSink`], and everything downstream (capture files, statistics) consumes the types here.
//! File formats are documented in `docs/trace-format.md`. Every size read from a file or given
//! as an option is checked against [`limits`] before it is used to allocate.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod atomic;
pub mod counts;
pub mod error;
pub mod generations;
pub mod limits;
pub mod manifest;
pub mod prompts;
pub mod reader;
pub mod record;
pub mod sink;
pub mod writer;

pub use atomic::{write_atomic, write_atomic_with};
pub use counts::{
    aggregate_paths, for_each_prompt_counts, for_each_prompt_counts_info, AggregateOptions,
    CountsTable, PromptCounts, StreamInfo,
};
pub use error::{Result, TraceError};
pub use generations::GenerationLine;
pub use manifest::{read_manifest_beside, Manifest, RoutingLayout};
pub use prompts::{prompt_set_hash, read_prompts, Prompt};
pub use reader::{
    install_external_format, Compression, CountsLine, ExternalFormat, ExternalItems, FlatEvent,
    TraceForm, TraceItem, TraceReader,
};
pub use record::{RoutingRecord, TokenType};
pub use sink::{RoutingDecision, RoutingSink};
pub use writer::{CountsWriter, EventsWriter, JsonlAppender};
