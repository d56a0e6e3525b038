//! cv
