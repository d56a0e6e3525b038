//! significance
