//! large_n
