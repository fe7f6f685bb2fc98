//! The RocksDB layout of subscriptions and their events.
//!
//! | family            | key                                  | value                 |
//! |-------------------|--------------------------------------|-----------------------|
//! | `subscriptions`   | subscription id (16)                 | [`StoredSubscription`] |
//! | `followers`       | patient pseudonym (16)               | [`FollowerList`]       |
//! | `events`          | subscription id (16) · number (8, BE) | [`StoredEvent`]        |
//! | `event_counters`  | subscription id (16)                 | newest number (8, BE)  |
//! | `event_counters`  | subscription id (16) · region        | [`PeerFollow`]         |
//!
//! The pointer writer reads `followers` for the patients of each group and writes the
//! group's events and counters in the group's own batch. Subscriptions are written
//! under the same lock as those groups, so a group either sees a subscription or was
//! durable before it existed.

use std::collections::HashMap;

use prost::Message;
use rocksdb::WriteBatch;

use super::db::{
    CF_EVENT_COUNTERS, CF_EVENTS, CF_FOLLOWERS, CF_SUBSCRIPTIONS, Db, DbError, corrupt,
};
use crate::{
    patient_keys::Pseudonym,
    store::{
        Change,
        events::{
            self, EventPage, Follower, Followers, PeerFollow, PeerState, StoredEvent,
            StoredSubscription, SubscriptionId,
        },
    },
};

/// A patient's followers, as stored.
#[derive(Clone, PartialEq, Message)]
pub struct FollowerList {
    #[prost(message, repeated, tag = "1")]
    pub followers: Vec<FollowerEntry>,
}

#[derive(Clone, PartialEq, Message)]
pub struct FollowerEntry {
    #[prost(bytes = "vec", tag = "1")]
    pub subscription: Vec<u8>,
    #[prost(string, repeated, tag = "2")]
    pub categories: Vec<String>,
    #[prost(int64, tag = "3")]
    pub expires_at: i64,
}

/// What the pointer writer keeps between groups: whether anyone follows anything, and
/// the newest event number of subscriptions it has written for.
#[derive(Default)]
pub struct FollowState {
    pub any: bool,
    pub counters: HashMap<SubscriptionId, u64>,
    /// When the newest journal group was written: the next is later.
    pub journal_at: i64,
}

fn event_key(id: &SubscriptionId, n: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(id);
    k[16..].copy_from_slice(&n.to_be_bytes());
    k
}

fn peer_key(id: &SubscriptionId, region: &str) -> Vec<u8> {
    [id.as_slice(), region.as_bytes()].concat()
}

fn to_id(b: &[u8]) -> Option<SubscriptionId> {
    b.try_into().ok()
}

impl Db {
    /// Whether any subscription has followers, at open.
    pub(super) fn any_followers(&self) -> Result<bool, DbError> {
        let mut it = self
            .db
            .iterator_cf(self.cf(CF_FOLLOWERS), rocksdb::IteratorMode::Start);
        Ok(it.next().transpose()?.is_some())
    }

    fn follower_list(&self, patient: &Pseudonym) -> Result<FollowerList, DbError> {
        match self.db.get_cf(self.cf(CF_FOLLOWERS), patient)? {
            None => Ok(FollowerList::default()),
            Some(v) => FollowerList::decode(&*v).map_err(|e| corrupt(CF_FOLLOWERS, &e.to_string())),
        }
    }

    /// The followers of the patients `changes` touch.
    fn followers(&self, changes: &[Change]) -> Result<Followers, DbError> {
        let patients = events::patients(changes);
        let cf = self.cf(CF_FOLLOWERS);
        let mut out = Followers::new();
        for (patient, value) in
            patients
                .iter()
                .zip(self.db.batched_multi_get_cf(cf, patients.iter(), false))
        {
            let Some(value) = value? else { continue };
            let list =
                FollowerList::decode(&*value).map_err(|e| corrupt(CF_FOLLOWERS, &e.to_string()))?;
            let fs: Vec<Follower> = list
                .followers
                .into_iter()
                .filter_map(|f| {
                    Some(Follower {
                        subscription: to_id(&f.subscription)?,
                        categories: f.categories,
                        expires_at: f.expires_at,
                    })
                })
                .collect();
            if !fs.is_empty() {
                out.insert(*patient, fs);
            }
        }
        Ok(out)
    }

    fn counter(&self, id: &SubscriptionId) -> Result<u64, DbError> {
        Ok(match self.db.get_cf(self.cf(CF_EVENT_COUNTERS), id)? {
            None => 0,
            Some(v) => u64::from_be_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| corrupt(CF_EVENT_COUNTERS, "bad counter"))?,
            ),
        })
    }

    /// Adds the events `changes` make to `batch`; returns the counters they advance,
    /// for [`FollowState`] once the batch is durable.
    pub(super) fn add_events(
        &self,
        state: &FollowState,
        changes: &[Change],
        now: i64,
        batch: &mut WriteBatch,
    ) -> Result<HashMap<SubscriptionId, u64>, DbError> {
        if !state.any {
            return Ok(HashMap::new());
        }
        let followers = self.followers(changes)?;
        if followers.is_empty() {
            return Ok(HashMap::new());
        }
        let mut last = HashMap::new();
        for id in events::subscriptions(changes, &followers) {
            let n = match state.counters.get(&id) {
                Some(n) => *n,
                None => self.counter(&id)?,
            };
            last.insert(id, n);
        }
        let made = events::events_for(changes, &followers, now, &mut last);
        let cf = self.cf(CF_EVENTS);
        for (id, n, event) in &made {
            batch.put_cf(cf, event_key(id, *n), event.encode_to_vec());
        }
        let counters = self.cf(CF_EVENT_COUNTERS);
        for (id, n) in &last {
            batch.put_cf(counters, id, n.to_be_bytes());
        }
        Ok(last)
    }

    /// Stores a subscription and makes its followers what it follows now.
    pub fn put_subscription(
        &self,
        id: &SubscriptionId,
        sub: &StoredSubscription,
    ) -> Result<(), DbError> {
        let mut state = self.follow_state();
        let old = self.subscription(id)?;
        let mut patients: Vec<Pseudonym> = old
            .iter()
            .flat_map(|o| o.followers(*id))
            .map(|(p, _)| p)
            .collect();
        let new: HashMap<Pseudonym, Follower> = sub.followers(*id).into_iter().collect();
        patients.extend(new.keys().copied());
        patients.sort_unstable();
        patients.dedup();
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_SUBSCRIPTIONS), id, sub.encode_to_vec());
        let cf = self.cf(CF_FOLLOWERS);
        for patient in &patients {
            let mut list = self.follower_list(patient)?;
            list.followers.retain(|f| f.subscription != id);
            if let Some(f) = new.get(patient) {
                list.followers.push(FollowerEntry {
                    subscription: id.to_vec(),
                    categories: f.categories.clone(),
                    expires_at: f.expires_at,
                });
            }
            if list.followers.is_empty() {
                batch.delete_cf(cf, patient);
            } else {
                batch.put_cf(cf, patient, list.encode_to_vec());
            }
        }
        self.write_synced(batch)?;
        state.any = state.any || !new.is_empty();
        Ok(())
    }

    pub fn subscription(&self, id: &SubscriptionId) -> Result<Option<StoredSubscription>, DbError> {
        self.db
            .get_cf(self.cf(CF_SUBSCRIPTIONS), id)?
            .map(|v| {
                StoredSubscription::decode(&*v)
                    .map_err(|e| corrupt(CF_SUBSCRIPTIONS, &e.to_string()))
            })
            .transpose()
    }

    /// Every subscription `owner` holds (every one, for `None`).
    pub fn subscriptions_of(
        &self,
        owner: Option<&str>,
    ) -> Result<Vec<(SubscriptionId, StoredSubscription)>, DbError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_SUBSCRIPTIONS), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item?;
            let sub = StoredSubscription::decode(&*v)
                .map_err(|e| corrupt(CF_SUBSCRIPTIONS, &e.to_string()))?;
            if owner.is_none_or(|o| sub.owner == o) {
                let id = to_id(&k).ok_or_else(|| corrupt(CF_SUBSCRIPTIONS, "bad key"))?;
                out.push((id, sub));
            }
        }
        Ok(out)
    }

    /// Up to `limit` events of `id` after number `after`.
    pub fn events(
        &self,
        id: &SubscriptionId,
        after: u64,
        limit: usize,
    ) -> Result<EventPage, DbError> {
        let last = self.counter(id)?;
        let oldest = self
            .prefix_iter(CF_EVENTS, id, &event_key(id, 0))
            .next()
            .transpose()?
            .map(|(k, _)| number(&k))
            .transpose()?;
        let mut events = Vec::new();
        for item in self
            .prefix_iter(CF_EVENTS, id, &event_key(id, after.saturating_add(1)))
            .take(limit)
        {
            let (k, v) = item?;
            events.push((number(&k)?, decode_event(&v)?));
        }
        Ok(EventPage {
            events,
            last,
            first_kept: events::first_kept(oldest, last),
        })
    }

    /// Keys of events made before `before`, in key order.
    fn events_before(&self, before: i64) -> impl Iterator<Item = Result<Box<[u8]>, DbError>> + '_ {
        self.db
            .iterator_cf(self.cf(CF_EVENTS), rocksdb::IteratorMode::Start)
            .filter_map(move |item| match item {
                Err(e) => Some(Err(e.into())),
                Ok((k, v)) => match decode_event(&v) {
                    Err(e) => Some(Err(e)),
                    Ok(event) => (event.at < before).then_some(Ok(k)),
                },
            })
    }

    /// Whether any event was written before `before`.
    pub fn events_due(&self, before: i64) -> Result<bool, DbError> {
        self.events_before(before)
            .next()
            .transpose()
            .map(|k| k.is_some())
    }

    /// Drops events written before `before` (unix nanoseconds); returns how many.
    pub fn drop_events(&self, before: i64, limit: usize) -> Result<usize, DbError> {
        let cf = self.cf(CF_EVENTS);
        let mut batch = WriteBatch::default();
        let mut dropped = 0;
        for key in self.events_before(before).take(limit) {
            batch.delete_cf(cf, key?);
            dropped += 1;
        }
        if dropped > 0 {
            self.write_synced(batch)?;
        }
        Ok(dropped)
    }
}

impl Db {
    fn peer_follow(
        &self,
        id: &SubscriptionId,
        region: &str,
    ) -> Result<Option<PeerFollow>, DbError> {
        self.db
            .get_cf(self.cf(CF_EVENT_COUNTERS), peer_key(id, region))?
            .map(|v| {
                PeerFollow::decode(&*v).map_err(|e| corrupt(CF_EVENT_COUNTERS, &e.to_string()))
            })
            .transpose()
    }

    /// How each other region follows `id`.
    pub fn peer_follows(&self, id: &SubscriptionId) -> Result<Vec<PeerFollow>, DbError> {
        let mut out = Vec::new();
        for item in self.prefix_iter(CF_EVENT_COUNTERS, id, id) {
            let (k, v) = item?;
            if k.len() > id.len() {
                out.push(
                    PeerFollow::decode(&*v)
                        .map_err(|e| corrupt(CF_EVENT_COUNTERS, &e.to_string()))?,
                );
            }
        }
        Ok(out)
    }

    pub fn set_peer_follow(
        &self,
        id: &SubscriptionId,
        region: &str,
        state: PeerState,
        detail: &str,
    ) -> Result<(), DbError> {
        let _turn = self.follow_state();
        let mut follow = self.peer_follow(id, region)?.unwrap_or_else(|| PeerFollow {
            region: region.to_string(),
            ..Default::default()
        });
        follow.state = state as i32;
        follow.detail = detail.to_string();
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_EVENT_COUNTERS),
            peer_key(id, region),
            follow.encode_to_vec(),
        );
        self.write_synced(batch)
    }

    /// Appends events collected from `region` and moves its position, atomically.
    pub fn collect_events(
        &self,
        id: &SubscriptionId,
        region: &str,
        from: u64,
        to: u64,
        collected: &[StoredEvent],
    ) -> Result<bool, DbError> {
        let mut state = self.follow_state();
        let mut follow = self.peer_follow(id, region)?.unwrap_or_else(|| PeerFollow {
            region: region.to_string(),
            ..Default::default()
        });
        if follow.position != from {
            return Ok(false);
        }
        follow.position = to;
        let mut n = match state.counters.get(id) {
            Some(n) => *n,
            None => self.counter(id)?,
        };
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_EVENTS);
        for event in collected {
            n += 1;
            batch.put_cf(cf, event_key(id, n), event.encode_to_vec());
        }
        let counters = self.cf(CF_EVENT_COUNTERS);
        batch.put_cf(counters, id, n.to_be_bytes());
        batch.put_cf(counters, peer_key(id, region), follow.encode_to_vec());
        match self.write_synced(batch) {
            Ok(()) => {
                state.counters.insert(*id, n);
                Ok(true)
            }
            Err(e) => {
                state.counters.clear();
                Err(e)
            }
        }
    }
}

/// An event key's number.
fn number(k: &[u8]) -> Result<u64, DbError> {
    k.get(16..)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt(CF_EVENTS, "bad key"))
}

fn decode_event(v: &[u8]) -> Result<StoredEvent, DbError> {
    StoredEvent::decode(v).map_err(|e| corrupt(CF_EVENTS, &e.to_string()))
}
