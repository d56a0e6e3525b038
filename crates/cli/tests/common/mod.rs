//! Helpers shared by the CLI integration tests (they need `CARGO_BIN_EXE_moe-xray`, which only
//! this crate's tests have, so they live here rather than in `moe-xray-test-support`). Each test
//! file uses a subset.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs the built `moe-xray` binary with `args`.
pub fn moe_xray(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe-xray"))
        .args(args)
        .output()
        .expect("run moe-xray")
}

/// A test path as `&str` (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The process's standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
