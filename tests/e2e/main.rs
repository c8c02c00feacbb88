//! The end-to-end test binary: the real `devhost` process against the fake
//! kubelet, one module per area.

mod abi_1_1;
mod bulkheads;
mod cdi;
mod cdi_oracle;
mod check;
mod cli;
mod deploy;
mod docs;
mod dra;
mod generic;
mod harness;
mod host;
mod hostile_dra;
mod hostile_probe;
mod hostile_world;
mod hostile_world_2;
mod module_output;
mod module_race;
mod native;
mod native_loader;
mod nvidia;
mod nvidia_cdi;
mod operate;
mod pci;
mod procs;
mod real_clients;
mod release;
mod sandbox;
mod sharing;
mod soak;
mod vendor_crate;
mod wasm;
mod wasm_1_1;
mod wire_contract;
mod worker_faults;
