//! olmoe
