//! The store conformance suite (DESIGN §2, §11): every test body is written once,
//! against `DynStore`, and the [`conformance!`] macro instantiates it for each
//! backend, so the two cannot drift apart unnoticed.
//!
//! SQLite runs always, in a fresh temporary directory per test. PostgreSQL runs when
//! `CONCORD_TEST_DATABASE_URL` is set (e.g. `postgres://postgres@127.0.0.1:5432/test`),
//! each test in its own freshly created schema; without it those tests say
//! `SKIPPED` on stderr and pass, unless `CONCORD_REQUIRE_ALL=1` makes them fail.

#[macro_use]
mod harness;

mod coordination;
mod dispatch;
mod events;
mod horizon;
mod idempotency;
mod instances;
mod memory;
mod messages;
mod pg_only;
mod primaries;
mod queue;
mod races;
mod state;
mod tokens;
