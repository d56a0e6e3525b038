//! moe-xray-health
