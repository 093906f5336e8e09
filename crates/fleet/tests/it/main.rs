//! fleet's integration tests, one binary with a module per topic (compiled once). They run the
//! real `fleet` binary against the test bed's OpenSSH hosts (`scripts/test.sh` brings it up).
//!
//! Tests run side by side. A test that changes the test bed for everyone (stops a host, cuts or
//! shapes a link, raises the wall, counts sshd processes) starts with `Testbed::alone()`, which
//! waits until no other test uses the bed and keeps the others out until it ends; every other
//! test shares the bed through `Testbed::get()`.

mod check;
mod exec;
mod help;
mod host_down;
mod init;
mod inventory_errors;
mod net;
mod network;
mod quickstart;
mod run;
mod sessions;
mod sync;
mod sync_faults;
