//! DRA's rules for device attributes and capacities: one implementation,
//! in the SDK crate, so that a backend's tests check what devhost checks.

pub use devhost_abi::device_info::*;
