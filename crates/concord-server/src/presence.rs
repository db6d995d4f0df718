//! In-memory presence (DESIGN §2 "Presence without a write per heartbeat").
//!
//! The hub that receives a heartbeat knows the instance's last heartbeat exactly and
//! answers from this table; the store is written only when the durable lease runs
//! low (see `concord_core::presence`), about twice per TTL per instance. The reaper
//! expires an owned instance at last heartbeat + TTL with a conditional write that
//! does nothing if another replica took the lease meanwhile.
//!
//! Sharded std `Mutex`es rather than one lock or a tokio mutex: a heartbeat holds a
//! shard for a hash lookup and a few integer updates, never across an await, and
//! sharding keeps 10,000 instances beating on all cores from queueing on one lock.

use concord_core::api::{HeartbeatResponse, Instance, InstanceState, Role};
use concord_core::presence::{expires_at, needs_durable_write};
use concord_core::Timestamp;
use concord_store::DurableHeartbeat;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};

const SHARDS: usize = 32;

#[derive(Clone)]
struct Entry {
    entity: Arc<str>,
    ttl_ms: i64,
    last_seen_ms: i64,
    durable_until_ms: i64,
    /// `secondary` or `fork`; whether it is primary comes from the entity view.
    base_role: Role,
}

#[derive(Clone, Default)]
struct EntityView {
    epoch: u64,
    primary: Option<String>,
}

pub enum Beat {
    Answered(HeartbeatResponse),
    /// Unknown here, expired, or the durable lease runs low: go to the store.
    NeedsStore,
}

pub struct Presence {
    shards: Vec<Mutex<HashMap<String, Entry>>>,
    entities: RwLock<HashMap<String, EntityView>>,
}

fn base_role(role: Role) -> Role {
    if role == Role::Fork {
        Role::Fork
    } else {
        Role::Secondary
    }
}

impl Default for Presence {
    fn default() -> Self {
        Presence {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            entities: RwLock::new(HashMap::new()),
        }
    }
}

impl Presence {
    fn shard(&self, id: &str) -> &Mutex<HashMap<String, Entry>> {
        let mut h = DefaultHasher::new();
        id.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    fn view(&self, entity: &str) -> Option<EntityView> {
        self.entities.read().ok()?.get(entity).cloned()
    }

    fn respond(&self, id: &str, e: &Entry, now: i64) -> Option<HeartbeatResponse> {
        let view = self.view(&e.entity)?;
        let is_primary = view.primary.as_deref() == Some(id);
        Some(HeartbeatResponse {
            lease_until: Timestamp(expires_at(now, e.ttl_ms)),
            role: if is_primary {
                Role::Primary
            } else {
                e.base_role
            },
            epoch: view.epoch,
            fence: is_primary.then_some(view.epoch),
        })
    }

    /// The common case of a heartbeat: answered without touching the store.
    pub fn beat(&self, id: &str, now: i64) -> Beat {
        let Ok(mut shard) = self.shard(id).lock() else {
            return Beat::NeedsStore;
        };
        let Some(e) = shard.get_mut(id) else {
            return Beat::NeedsStore;
        };
        if now > expires_at(e.last_seen_ms, e.ttl_ms)
            || needs_durable_write(now, e.durable_until_ms, e.ttl_ms)
        {
            return Beat::NeedsStore;
        }
        e.last_seen_ms = now;
        let e = e.clone();
        drop(shard);
        match self.respond(id, &e, now) {
            Some(r) => Beat::Answered(r),
            None => Beat::NeedsStore,
        }
    }

    /// Records a durable heartbeat (this hub now owns the lease) and answers it.
    pub fn after_durable(&self, hb: &DurableHeartbeat, now: i64) -> HeartbeatResponse {
        let i = &hb.instance;
        let entry = Entry {
            entity: Arc::from(i.entity.as_str()),
            ttl_ms: i.ttl_ms,
            last_seen_ms: now,
            durable_until_ms: i.lease_until.millis(),
            base_role: base_role(i.role),
        };
        let primary = hb.fence.map(|_| i.id.clone());
        self.set_entity_if_newer(&i.entity, hb.epoch, primary, hb.fence.is_some());
        if let Ok(mut shard) = self.shard(&i.id).lock() {
            shard.insert(i.id.clone(), entry.clone());
        }
        self.respond(&i.id, &entry, now)
            .unwrap_or(HeartbeatResponse {
                lease_until: Timestamp(expires_at(now, i.ttl_ms)),
                role: i.role,
                epoch: hb.epoch,
                fence: hb.fence,
            })
    }

    /// A newly registered instance: owned by this hub, lease as written.
    pub fn registered(&self, i: &Instance, epoch: u64, is_primary: bool, now: i64) {
        let entry = Entry {
            entity: Arc::from(i.entity.as_str()),
            ttl_ms: i.ttl_ms,
            last_seen_ms: now,
            durable_until_ms: i.lease_until.millis(),
            base_role: base_role(i.role),
        };
        self.set_entity_if_newer(
            &i.entity,
            epoch,
            is_primary.then(|| i.id.clone()),
            is_primary,
        );
        if let Ok(mut shard) = self.shard(&i.id).lock() {
            shard.insert(i.id.clone(), entry);
        }
    }

    pub fn remove(&self, id: &str) {
        if let Ok(mut shard) = self.shard(id).lock() {
            shard.remove(id);
        }
    }

    /// The entity's epoch and primary changed (a grant, a transfer, a release).
    pub fn set_entity(&self, entity: &str, epoch: u64, primary: Option<String>) {
        if let Ok(mut map) = self.entities.write() {
            let v = map.entry(entity.to_string()).or_default();
            if epoch >= v.epoch {
                v.epoch = epoch;
                v.primary = primary;
            }
        }
    }

    fn set_entity_if_newer(
        &self,
        entity: &str,
        epoch: u64,
        primary: Option<String>,
        authoritative: bool,
    ) {
        if let Ok(mut map) = self.entities.write() {
            let v = map.entry(entity.to_string()).or_default();
            if epoch > v.epoch || (epoch == v.epoch && authoritative) {
                v.epoch = epoch;
                v.primary = primary;
            } else if epoch == v.epoch && v.primary.is_none() && primary.is_some() {
                v.primary = primary;
            }
        }
    }

    /// A primary released its role (resign, expiry, close).
    pub fn primary_released(&self, entity: &str, instance: &str) {
        if let Ok(mut map) = self.entities.write() {
            if let Some(v) = map.get_mut(entity) {
                if v.primary.as_deref() == Some(instance) {
                    v.primary = None;
                }
            }
        }
    }

    /// Instances whose last heartbeat here is older than their TTL.
    pub fn overdue(&self, now: i64) -> Vec<String> {
        let mut out = Vec::new();
        for shard in &self.shards {
            if let Ok(shard) = shard.lock() {
                out.extend(
                    shard
                        .iter()
                        .filter(|(_, e)| now > expires_at(e.last_seen_ms, e.ttl_ms))
                        .map(|(id, _)| id.clone()),
                );
            }
        }
        out
    }

    /// Overlays what this hub knows of an instance's presence on the stored record.
    pub fn overlay(&self, i: &mut Instance) {
        if i.state != InstanceState::Live {
            return;
        }
        if let Ok(shard) = self.shard(&i.id).lock() {
            if let Some(e) = shard.get(&i.id) {
                if e.last_seen_ms > i.last_seen_at.millis() {
                    i.last_seen_at = Timestamp(e.last_seen_ms);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }
}
