//! End-to-end tests of the `concord` binary through its public interfaces.

mod harness;

mod authz;
mod bad_input;
mod chaos;
mod breakers;
mod cli;
mod crash;
mod dispatch;
mod events;
mod failover;
mod limits;
mod memory;
mod mcp;
mod leases;
mod primaries;
mod queue;
mod replicas;
mod tokens;
