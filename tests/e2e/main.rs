//! The end-to-end test binary: the real `devhost` process against the fake
//! kubelet, one module per area.

mod cli;
mod harness;
mod host;
mod native;
mod native_loader;
mod operate;
mod wire_contract;
