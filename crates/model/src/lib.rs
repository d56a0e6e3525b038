//! moe-xray-model
