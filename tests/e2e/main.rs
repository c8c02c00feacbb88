//! The end-to-end test binary: the real `devhost` process against the fake
//! kubelet, one module per area.

mod harness;
mod host;
mod native;
mod native_loader;
mod wire_contract;
