//! The one authorization table: who may do what.
//!
//! Handlers never decide access ad hoc; they name their [`Action`] and call
//! [`authorize`]. A test walks [`Action::ALL`] so a route without a rule cannot exist.
//! Finer rules that need the store (is this instance the primary, is the fence
//! current) stay in the store's transaction; this table only says which kinds of
//! caller may attempt the action at all, and over which entity or instance.

use crate::error::Error;
use crate::token::TokenKind;

/// The caller, resolved from its bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token_id: String,
    pub kind: TokenKind,
    /// Agent tokens: the entity they are bound to. Session tokens: the instance's entity.
    pub entity: Option<String>,
    /// Session tokens: the instance they are bound to.
    pub instance: Option<String>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.kind == TokenKind::Admin
    }
    /// How the caller is named in provenance and `updated_by` fields.
    pub fn actor(&self) -> String {
        match (&self.instance, self.kind) {
            (Some(i), _) => i.clone(),
            (None, k) => format!("{}:{}", k.as_str(), self.token_id),
        }
    }
}

/// One kind of caller that a rule admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Admin,
    Reader,
    /// Any agent token.
    AgentAny,
    /// An agent token bound to the target entity.
    AgentOwnEntity,
    /// Any instance session.
    SessionAny,
    /// A session of an instance of the target entity.
    SessionOwnEntity,
    /// The session of the target instance itself.
    SessionSelf,
}

/// Every action a route can take. Add a variant with its rule when adding a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    TokenCreate,
    TokenList,
    TokenRevoke,
    InstanceRegister,
    InstanceRead,
    InstanceUpdate,
    InstanceClose,
    InstanceHeartbeat,
    EntityRead,
    PrimaryCampaign,
    PrimaryResign,
    PrimaryTransfer,
    Route,
    GhostRead,
    StateRead,
    StateWrite,
    StatusRead,
    EventPublish,
    EventRead,
    MessageSend,
    InboxRead,
    TaskEnqueue,
    TaskRead,
    TaskWork,
    TaskClaim,
    TaskCancel,
    ScheduleWrite,
    Dispatch,
    MemoryWrite,
    MemoryRead,
    TrustRead,
    TrustWrite,
    CircleRead,
    CircleWrite,
    ForkRead,
    ForkPromote,
    WhoAmI,
    Observe,
    BreakerRead,
    BreakerProbe,
    LeaseAcquire,
    LeaseRead,
    LeaseRelease,
    LeaseForceRelease,
}

use Grant::*;

const READ_ALL: &[Grant] = &[Admin, Reader, AgentAny, SessionAny];

impl Action {
    pub const ALL: &'static [Action] = &[
        Action::TokenCreate,
        Action::TokenList,
        Action::TokenRevoke,
        Action::InstanceRegister,
        Action::InstanceRead,
        Action::InstanceUpdate,
        Action::InstanceClose,
        Action::InstanceHeartbeat,
        Action::EntityRead,
        Action::PrimaryCampaign,
        Action::PrimaryResign,
        Action::PrimaryTransfer,
        Action::Route,
        Action::GhostRead,
        Action::StateRead,
        Action::StateWrite,
        Action::StatusRead,
        Action::EventPublish,
        Action::EventRead,
        Action::MessageSend,
        Action::InboxRead,
        Action::TaskEnqueue,
        Action::TaskRead,
        Action::TaskWork,
        Action::TaskClaim,
        Action::TaskCancel,
        Action::ScheduleWrite,
        Action::Dispatch,
        Action::MemoryWrite,
        Action::MemoryRead,
        Action::TrustRead,
        Action::TrustWrite,
        Action::CircleRead,
        Action::CircleWrite,
        Action::ForkRead,
        Action::ForkPromote,
        Action::WhoAmI,
        Action::Observe,
        Action::BreakerRead,
        Action::BreakerProbe,
        Action::LeaseAcquire,
        Action::LeaseRead,
        Action::LeaseRelease,
        Action::LeaseForceRelease,
    ];

    /// Writes to shared state that a ghost (an unlabelled secondary or fork) may not
    /// make until it is labelled (DESIGN §4); checked against the instance's record.
    pub fn denies_ghosts(self) -> bool {
        matches!(
            self,
            Action::PrimaryCampaign
                | Action::PrimaryResign
                | Action::PrimaryTransfer
                | Action::StateWrite
                | Action::EventPublish
                | Action::MessageSend
                | Action::TaskEnqueue
                | Action::TaskClaim
                | Action::TaskCancel
                | Action::Dispatch
                | Action::Observe
                | Action::BreakerProbe
                | Action::LeaseAcquire
        )
    }

    /// The table.
    pub fn rule(self) -> &'static [Grant] {
        match self {
            Action::TokenCreate | Action::TokenList | Action::TokenRevoke => &[Admin],
            Action::InstanceRegister => &[Admin, AgentOwnEntity],
            Action::InstanceRead
            | Action::EntityRead
            | Action::Route
            | Action::GhostRead
            | Action::StateRead
            | Action::StatusRead
            | Action::EventRead
            | Action::TaskRead
            | Action::BreakerRead
            | Action::LeaseRead => READ_ALL,
            // Observations and leases carry the caller's instance as provenance and
            // holder: only instance sessions have one.
            Action::Observe
            | Action::BreakerProbe
            | Action::LeaseAcquire
            | Action::LeaseRelease => &[SessionAny],
            Action::LeaseForceRelease => &[Admin],
            Action::TaskEnqueue | Action::TaskCancel | Action::Dispatch => {
                &[Admin, AgentAny, SessionAny]
            }
            Action::WhoAmI => READ_ALL,
            // Claims are by instances; the claim token is what completes a task.
            Action::TaskWork => &[Admin, SessionAny],
            Action::TaskClaim => &[SessionAny],
            Action::ScheduleWrite => &[Admin, AgentAny],
            // Memory reads are filtered by visibility at the source, per memory.
            Action::MemoryRead | Action::TrustRead | Action::CircleRead | Action::ForkRead => {
                READ_ALL
            }
            // Which space an instance may write is the store's call (fencing,
            // liveness, labels), in the write's transaction.
            Action::MemoryWrite => &[Admin, SessionAny],
            Action::CircleWrite => &[Admin],
            // The store checks that the session is the entity's live primary.
            Action::TrustWrite | Action::ForkPromote => &[Admin, SessionOwnEntity],
            Action::EventPublish | Action::MessageSend => &[Admin, AgentAny, SessionAny],
            Action::InboxRead => &[SessionSelf],
            Action::InstanceUpdate | Action::InstanceClose => &[Admin, AgentOwnEntity, SessionSelf],
            Action::InstanceHeartbeat => &[SessionSelf],
            Action::PrimaryCampaign => &[Admin, SessionSelf],
            Action::PrimaryResign | Action::PrimaryTransfer | Action::StateWrite => {
                &[Admin, SessionOwnEntity]
            }
        }
    }
}

/// What the action is applied to, as far as the route knows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Target<'a> {
    pub entity: Option<&'a str>,
    pub instance: Option<&'a str>,
}

fn admits(grant: Grant, p: &Principal, t: Target<'_>) -> bool {
    let same_entity = || t.entity.is_some() && p.entity.as_deref() == t.entity;
    match grant {
        Admin => p.kind == TokenKind::Admin,
        Reader => p.kind == TokenKind::Reader,
        AgentAny => p.kind == TokenKind::Agent,
        AgentOwnEntity => p.kind == TokenKind::Agent && same_entity(),
        SessionAny => p.kind == TokenKind::Session,
        SessionOwnEntity => p.kind == TokenKind::Session && same_entity(),
        SessionSelf => {
            p.kind == TokenKind::Session
                && t.instance.is_some()
                && p.instance.as_deref() == t.instance
        }
    }
}

pub fn authorize(p: &Principal, action: Action, target: Target<'_>) -> Result<(), Error> {
    if action.rule().iter().any(|g| admits(*g, p, target)) {
        Ok(())
    } else {
        Err(Error::forbidden(format!(
            "a {} token may not {:?}{}",
            p.kind.as_str(),
            action,
            match (target.entity, target.instance) {
                (_, Some(i)) => format!(" on instance {i}"),
                (Some(e), None) => format!(" on entity {e}"),
                _ => String::new(),
            }
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kind: TokenKind, entity: Option<&str>, instance: Option<&str>) -> Principal {
        Principal {
            token_id: "tok_x".into(),
            kind,
            entity: entity.map(Into::into),
            instance: instance.map(Into::into),
        }
    }

    #[test]
    fn every_action_has_a_rule_and_admin_is_not_locked_out_of_administration() {
        for a in Action::ALL {
            assert!(!a.rule().is_empty(), "{a:?} has no rule");
        }
        let admin = p(TokenKind::Admin, None, None);
        assert!(authorize(&admin, Action::TokenCreate, Target::default()).is_ok());
    }

    #[test]
    fn agents_are_bound_to_their_entity() {
        let agent = p(TokenKind::Agent, Some("sisters"), None);
        let own = Target {
            entity: Some("sisters"),
            instance: None,
        };
        let other = Target {
            entity: Some("anvil"),
            instance: None,
        };
        assert!(authorize(&agent, Action::InstanceRegister, own).is_ok());
        assert!(authorize(&agent, Action::InstanceRegister, other).is_err());
    }

    #[test]
    fn readers_never_write() {
        let reader = p(TokenKind::Reader, None, None);
        let t = Target {
            entity: Some("sisters"),
            instance: Some("ins_a"),
        };
        for a in [
            Action::StateWrite,
            Action::InstanceRegister,
            Action::TokenCreate,
            Action::InstanceClose,
        ] {
            assert!(authorize(&reader, a, t).is_err(), "{a:?}");
        }
        assert!(authorize(&reader, Action::StateRead, t).is_ok());
    }

    #[test]
    fn heartbeats_only_from_the_instance_itself() {
        let me = p(TokenKind::Session, Some("sisters"), Some("ins_a"));
        assert!(authorize(
            &me,
            Action::InstanceHeartbeat,
            Target {
                entity: None,
                instance: Some("ins_a")
            }
        )
        .is_ok());
        assert!(authorize(
            &me,
            Action::InstanceHeartbeat,
            Target {
                entity: None,
                instance: Some("ins_b")
            }
        )
        .is_err());
    }
}
