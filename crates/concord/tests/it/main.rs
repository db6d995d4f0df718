//! End-to-end tests of the `concord` binary through its public interfaces.

mod harness;

mod authz;
mod bad_input;
mod breakers;
mod chaos;
mod cli;
mod crash;
mod dispatch;
mod events;
mod failover;
mod fleet;
mod fuzz;
mod leases;
mod limits;
mod mcp;
mod memory;
mod primaries;
mod queue;
mod replicas;
mod spool;
mod tokens;
mod ui;
