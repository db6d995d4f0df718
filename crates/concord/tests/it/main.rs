//! End-to-end tests of the `concord` binary through its public interfaces.

mod harness;

mod bad_input;
mod cli;
mod crash;
mod events;
mod mcp;
mod primaries;
mod queue;
mod tokens;
