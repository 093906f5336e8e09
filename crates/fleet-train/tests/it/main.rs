//! fleet-train's integration tests, one binary with a module per topic: the trainer's ranks on
//! this machine and under `fleet run` on the test bed, its C++ shim's symbols and its `--help`.
//! Test-bed use is shared or alone as in fleet's tests (`fleet_testkit::Testbed`).

mod help;
mod train;
mod train_shim;
