//! Concord's domain: the types every other crate speaks and the rules that do not
//! need I/O (validation, lease arithmetic, fencing, authorization).
//!
//! Keeping these pure means the SQLite and PostgreSQL backends, the HTTP handlers
//! and the client all agree on one definition of, say, "is this fence current",
//! and each rule is unit- and property-tested without a database.

pub mod address;
pub mod api;
pub mod authz;
pub mod breaker;
pub mod dispatch;
pub mod error;
pub mod fencing;
pub mod fleet;
pub mod idempotency;
pub mod ids;
pub mod lease;
pub mod memory;
pub mod presence;
pub mod recall;
pub mod task;
pub mod time;
pub mod token;
pub mod topic;
pub mod validate;

pub use error::{Error, ErrorCode, Result};
pub use time::Timestamp;
