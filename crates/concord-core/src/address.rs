//! Message addresses (DESIGN §6): who a message is for.

use crate::error::Error;
use crate::validate;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// One instance.
    Instance(String),
    /// Every live instance of an entity.
    Entity(String),
    /// The entity's current primary.
    Primary(String),
    /// Every live instance that has the capability.
    Capability(String),
}

impl Address {
    pub fn parse(field: &str, s: &str) -> Result<Address, Error> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            Error::bad_field(
                field,
                format!("{s:?} must be instance:ID, entity:NAME, primary:NAME or cap:CAPABILITY"),
            )
        })?;
        match kind {
            "instance" => {
                if !crate::ids::has_prefix(rest, crate::ids::INSTANCE) {
                    return Err(Error::bad_field(
                        field,
                        format!("{rest:?} is not an instance id (ins_…)"),
                    ));
                }
                Ok(Address::Instance(rest.into()))
            }
            "entity" => validate::name(field, rest).map(|_| Address::Entity(rest.into())),
            "primary" => validate::name(field, rest).map(|_| Address::Primary(rest.into())),
            "cap" => validate::name(field, rest).map(|_| Address::Capability(rest.into())),
            other => Err(Error::bad_field(
                field,
                format!("unknown address kind {other:?}: use instance:, entity:, primary: or cap:"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            Address::parse("to", "entity:sisters").unwrap(),
            Address::Entity("sisters".into())
        );
        assert_eq!(
            Address::parse("to", "cap:review").unwrap(),
            Address::Capability("review".into())
        );
        assert!(Address::parse("to", "sisters").is_err());
        assert!(Address::parse("to", "instance:nope").is_err());
        assert!(Address::parse("to", "team:x").is_err());
        assert_eq!(
            Address::parse("to", "entity:").unwrap_err().details["field"],
            "to"
        );
    }
}
