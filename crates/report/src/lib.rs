//! moe-xray-report
