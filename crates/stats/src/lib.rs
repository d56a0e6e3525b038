//! moe-xray-stats
