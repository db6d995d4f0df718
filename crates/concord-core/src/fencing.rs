//! Fencing: the rule that only the current primary, holding the current epoch, may
//! write an entity's production state.
//!
//! The store evaluates this inside the same transaction as the write, with the
//! entity row locked, so a primary that was paused or partitioned and has since
//! lost the role can never slip a write in.

use crate::error::Error;
use serde::{de::Error as _, Deserialize, Deserializer};

/// The largest fence a caller may present. Epochs are stored as signed 64-bit
/// integers, so a larger fence can never be current; it is refused as bad input
/// (naming the field) rather than wrapped or silently ignored.
pub const MAX_FENCE: u64 = i64::MAX as u64;

/// `deserialize_with` for the `fence` of a request (body or query string).
pub fn deserialize_fence<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<u64>::deserialize(d)? {
        Some(f) if f > MAX_FENCE => Err(D::Error::custom(format!(
            "{f} is out of range: a fence is at most {MAX_FENCE}"
        ))),
        v => Ok(v),
    }
}

/// What the store knows about the entity at the moment of the write.
#[derive(Debug, Clone, Copy)]
pub struct FenceView<'a> {
    pub epoch: u64,
    /// The live primary, if any.
    pub primary: Option<&'a str>,
}

/// Checks that `writer` presenting `fence` may write now.
pub fn check_fence(view: FenceView<'_>, writer: &str, fence: Option<u64>) -> Result<(), Error> {
    let Some(fence) = fence else {
        return Err(Error::fenced(
            view.epoch,
            "a write to production state must carry `fence` (the epoch of your primary grant)",
        ));
    };
    if view.primary != Some(writer) {
        return Err(Error::fenced(
            view.epoch,
            format!("instance {writer} is not the current primary"),
        ));
    }
    if fence != view.epoch {
        return Err(Error::fenced(
            view.epoch,
            format!(
                "fence {fence} is stale: the current epoch is {}",
                view.epoch
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use proptest::prelude::*;

    #[test]
    fn current_primary_with_current_fence_may_write() {
        let v = FenceView {
            epoch: 3,
            primary: Some("ins_a"),
        };
        assert!(check_fence(v, "ins_a", Some(3)).is_ok());
    }

    #[test]
    fn missing_fence_is_fenced() {
        let v = FenceView {
            epoch: 3,
            primary: Some("ins_a"),
        };
        let e = check_fence(v, "ins_a", None).unwrap_err();
        assert_eq!(e.code, ErrorCode::Fenced);
        assert_eq!(e.details["epoch"], 3);
    }

    proptest! {
        #[test]
        fn only_exact_epoch_and_primary_pass(epoch in 0u64..1000, fence in 0u64..1000, is_primary: bool, has_primary: bool) {
            let primary = if has_primary { Some("ins_p") } else { None };
            let writer = if is_primary { "ins_p" } else { "ins_other" };
            let ok = check_fence(FenceView { epoch, primary }, writer, Some(fence)).is_ok();
            prop_assert_eq!(ok, has_primary && is_primary && fence == epoch);
        }
    }
}
