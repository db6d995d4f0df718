//! End-to-end tests of the `concord` binary through its public interfaces.

mod harness;

mod bad_input;
mod breakers;
mod cli;
mod crash;
mod dispatch;
mod events;
mod leases;
mod primaries;
mod queue;
mod tokens;
