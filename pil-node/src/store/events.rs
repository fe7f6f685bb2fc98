//! Change events: the subscriptions that follow patients, and the events a pointer
//! change makes for them. Every engine writes a group's events in the same atomic
//! write as its pointer changes, numbered here, so an acknowledged write to a
//! followed patient always has its event and each subscription's numbers have no gap.

use std::collections::{BTreeSet, HashMap};

use prost::Message;

use super::model::{Change, PointerKey, StoredPointer};
use crate::patient_keys::{PSEUDONYM_LEN, Pseudonym};

/// A subscription's id: random, so that it names one subscription and guesses none.
pub type SubscriptionId = [u8; 16];

/// A subscription as stored: who holds it, what it follows, until when.
#[derive(Clone, PartialEq, Message)]
pub struct StoredSubscription {
    /// The owning organization's number; only it may read, renew or end it.
    #[prost(string, tag = "1")]
    pub owner: String,
    /// What the requester's token said when subscribing or renewing (JSON of
    /// `access::Requester`), deciding every delivery.
    #[prost(bytes = "vec", tag = "2")]
    pub requester: Vec<u8>,
    /// Categories followed; empty: every category.
    #[prost(string, repeated, tag = "3")]
    pub categories: Vec<String>,
    #[prost(message, repeated, tag = "4")]
    pub patients: Vec<FollowedPatient>,
    #[prost(int64, tag = "5")]
    pub created_at: i64,
    /// Unix nanoseconds; no events are made for it after this.
    #[prost(int64, tag = "6")]
    pub expires_at: i64,
    #[prost(bool, tag = "7")]
    pub ended: bool,
    /// The region whose node registered it here, collecting its events; empty when it
    /// was subscribed at this region.
    #[prost(string, tag = "8")]
    pub home: String,
}

/// One patient a subscription follows.
#[derive(Clone, PartialEq, Message)]
pub struct FollowedPatient {
    #[prost(bytes = "vec", tag = "1")]
    pub pseudonym: Vec<u8>,
    /// `PatientKeys::seal` of the identifier, to name the patient in events.
    #[prost(bytes = "vec", tag = "2")]
    pub sealed: Vec<u8>,
    /// No longer followed (an opt-out or a block stopped delivery); stays stopped.
    #[prost(bool, tag = "3")]
    pub stopped: bool,
    /// The patient's pseudonyms under earlier keys: changes and events stored under
    /// them still reach this subscription while a pseudonym-key rotation runs.
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub former: Vec<Vec<u8>>,
}

impl FollowedPatient {
    /// Whether `pseudonym` names this patient, under the key in force or an earlier one.
    pub fn is(&self, pseudonym: &[u8]) -> bool {
        self.pseudonym == pseudonym || self.former.iter().any(|f| f == pseudonym)
    }
}

impl StoredSubscription {
    /// Whether it makes events at `now`.
    pub fn current(&self, now: i64) -> bool {
        !self.ended && now < self.expires_at
    }

    /// The patients it follows now, with what the write path needs to know.
    pub fn followers(&self, id: SubscriptionId) -> Vec<(Pseudonym, Follower)> {
        if self.ended {
            return Vec::new();
        }
        self.patients
            .iter()
            .filter(|p| !p.stopped)
            .flat_map(|p| std::iter::once(&p.pseudonym).chain(&p.former))
            .filter_map(|pseudonym| {
                let pseudonym: Pseudonym = pseudonym.as_slice().try_into().ok()?;
                Some((
                    pseudonym,
                    Follower {
                        subscription: id,
                        categories: self.categories.clone(),
                        expires_at: self.expires_at,
                    },
                ))
            })
            .collect()
    }
}

/// What happened to a followed patient's pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, prost::Enumeration)]
#[repr(i32)]
pub enum EventKind {
    Unspecified = 0,
    Appeared = 1,
    Changed = 2,
    Removed = 3,
    Lapsed = 4,
    /// Collected from another region: that region stopped following the patient.
    Unfollowed = 5,
    /// Collected from another region: a change that region did not show.
    NotShown = 6,
}

/// One event as stored, numbered by its subscription.
#[derive(Clone, PartialEq, Message)]
pub struct StoredEvent {
    #[prost(enumeration = "EventKind", tag = "1")]
    pub kind: i32,
    /// The pointer's key (`PointerKey::encode`).
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    /// The pointer as the change left it; for a removal, as it was.
    #[prost(message, optional, tag = "3")]
    pub pointer: Option<StoredPointer>,
    /// When the change was written, unix nanoseconds.
    #[prost(int64, tag = "4")]
    pub at: i64,
    /// The region it was collected from; empty: this region's own change, and `key`
    /// is the pointer's. Otherwise `key` is this region's pseudonym of the patient.
    #[prost(string, tag = "5")]
    pub region: String,
    /// Collected: the pointer as that region decided to show it (an encoded
    /// `pil.v1.Pointer`; empty when it showed none).
    #[prost(bytes = "vec", tag = "6")]
    pub shown: Vec<u8>,
    /// Collected: its number in that region's numbering.
    #[prost(uint64, tag = "7")]
    pub origin_number: u64,
    /// Journaled: the categories before a change of content, to tell whether it
    /// moved out of a subscription's categories.
    #[prost(string, repeated, tag = "8")]
    pub previous_categories: Vec<String>,
}

/// How another region follows a subscription made here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum PeerState {
    Pending = 0,
    Following = 1,
    Refused = 2,
    Ended = 3,
    /// Not registered: its routing summary holds none of the followed patients.
    HoldsNothing = 4,
}

/// Another region's part in a subscription made here: whether it is registered
/// there, and the last of that region's event numbers stored here.
#[derive(Clone, PartialEq, Message)]
pub struct PeerFollow {
    #[prost(string, tag = "1")]
    pub region: String,
    #[prost(enumeration = "PeerState", tag = "2")]
    pub state: i32,
    #[prost(string, tag = "3")]
    pub detail: String,
    /// Advanced only together with the events it collected, in one atomic write.
    #[prost(uint64, tag = "4")]
    pub position: u64,
}

impl StoredEvent {
    pub fn patient(&self) -> Option<Pseudonym> {
        self.key.get(..PSEUDONYM_LEN)?.try_into().ok()
    }

    pub fn pointer_key(&self) -> Option<PointerKey> {
        PointerKey::decode(&self.key)
    }
}

/// A subscription following a patient, as the write path reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Follower {
    pub subscription: SubscriptionId,
    pub categories: Vec<String>,
    pub expires_at: i64,
}

impl Follower {
    fn wants(&self, pointer: &StoredPointer, now: i64) -> bool {
        now < self.expires_at
            && (self.categories.is_empty()
                || pointer
                    .categories
                    .iter()
                    .any(|c| self.categories.contains(c)))
    }
}

/// The followers of each patient a write touches.
pub type Followers = HashMap<Pseudonym, Vec<Follower>>;

/// A page of a subscription's events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventPage {
    /// Events after the asked position, in order.
    pub events: Vec<(u64, StoredEvent)>,
    /// The subscription's newest event number (0: none yet).
    pub last: u64,
    /// The oldest event number still kept; older ones were dropped by retention.
    pub first_kept: u64,
}

/// The distinct patients `changes` touch, to read their followers.
pub fn patients(changes: &[Change]) -> Vec<Pseudonym> {
    let set: BTreeSet<Pseudonym> = changes.iter().map(|c| c.key().patient).collect();
    set.into_iter().collect()
}

/// The subscriptions that follow any patient in `changes`, to read their counters.
pub fn subscriptions(changes: &[Change], followers: &Followers) -> Vec<SubscriptionId> {
    let mut set = BTreeSet::new();
    for change in changes {
        for f in followers.get(&change.key().patient).into_iter().flatten() {
            set.insert(f.subscription);
        }
    }
    set.into_iter().collect()
}

/// The events `changes` make for their patients' followers at `now`, numbered after
/// each subscription's newest number in `last` (which this advances; a subscription
/// missing from it has none yet). A refresh that changes no content makes none.
pub fn events_for(
    changes: &[Change],
    followers: &Followers,
    now: i64,
    last: &mut HashMap<SubscriptionId, u64>,
) -> Vec<(SubscriptionId, u64, StoredEvent)> {
    let mut out = Vec::new();
    if followers.is_empty() {
        return out;
    }
    for change in changes {
        let key = change.key();
        let Some(fs) = followers.get(&key.patient) else {
            continue;
        };
        let Some((kind, pointer, before)) = event_of(change) else {
            continue;
        };
        for f in fs {
            // A change into or out of the followed categories counts too.
            if !(f.wants(pointer, now) || before.is_some_and(|b| f.wants(b, now))) {
                continue;
            }
            let n = last.entry(f.subscription).or_default();
            *n += 1;
            out.push((
                f.subscription,
                *n,
                StoredEvent {
                    kind: kind as i32,
                    key: key.encode().to_vec(),
                    pointer: Some(StoredPointer::clone(pointer)),
                    at: now,
                    ..Default::default()
                },
            ));
        }
    }
    out
}

/// A change as an event: its kind, the pointer as it left it (for a removal, as it
/// was), and for a change of content the pointer before. None for a refresh that
/// changed no content.
fn event_of(change: &Change) -> Option<(EventKind, &StoredPointer, Option<&StoredPointer>)> {
    match change {
        Change::Put {
            value,
            previous: None,
            ..
        } => Some((EventKind::Appeared, value, None)),
        Change::Put {
            value,
            previous: Some(prev),
            ..
        } => (!prev.same_content(value)).then_some((EventKind::Changed, &**value, Some(&**prev))),
        Change::Delete {
            previous, lapsed, ..
        } => {
            let kind = if *lapsed {
                EventKind::Lapsed
            } else {
                EventKind::Removed
            };
            Some((kind, previous, None))
        }
    }
}

/// The journal entries `changes` make at `now`: every change of content, whoever
/// follows it. A region cannot know which of its patients are followed elsewhere, so
/// it keeps all its changes a bounded time; a subscription registered here only once
/// this region came to hold its patient is given the changes made since it was made
/// ([`Journal`]).
pub fn journal_for(changes: &[Change], now: i64) -> Vec<StoredEvent> {
    changes
        .iter()
        .filter_map(|change| {
            let (kind, pointer, before) = event_of(change)?;
            Some(StoredEvent {
                kind: kind as i32,
                key: change.key().encode().to_vec(),
                pointer: Some(pointer.clone()),
                at: now,
                previous_categories: before.map(|b| b.categories.clone()).unwrap_or_default(),
                ..Default::default()
            })
        })
        .collect()
}

/// What the journal holds of some patients since a time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Journal {
    /// Their changes since the time asked, in the order they were written.
    pub events: Vec<StoredEvent>,
    /// The journal holds every change written from this time (unix nanoseconds) on;
    /// older ones were dropped, or made before it was kept.
    pub complete_from: i64,
}

impl StoredEvent {
    /// Whether a subscription following `categories` (empty: all) is told of this
    /// journaled change: a change into or out of them counts too.
    pub fn concerns(&self, categories: &[String]) -> bool {
        categories.is_empty()
            || self
                .pointer
                .iter()
                .flat_map(|p| &p.categories)
                .chain(&self.previous_categories)
                .any(|c| categories.contains(c))
    }
}

/// The first event number kept when `oldest` is the oldest stored one (`None`: none
/// stored) and `last` the newest ever made.
pub fn first_kept(oldest: Option<u64>, last: u64) -> u64 {
    oldest.unwrap_or(last + 1)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::IDENT_LEN;

    fn key(p: u8) -> PointerKey {
        PointerKey {
            patient: [p; PSEUDONYM_LEN],
            org: *b"974760673",
            ident: [1; IDENT_LEN],
        }
    }

    fn pointer(categories: &[&str], n: i64) -> Arc<StoredPointer> {
        Arc::new(StoredPointer {
            base_url: "https://x.no".into(),
            categories: categories.iter().map(|c| c.to_string()).collect(),
            last_updated: n,
            ..Default::default()
        })
    }

    fn follower(s: u8, categories: &[&str]) -> Follower {
        Follower {
            subscription: [s; 16],
            categories: categories.iter().map(|c| c.to_string()).collect(),
            expires_at: 1_000,
        }
    }

    #[test]
    fn each_subscription_numbers_its_events_without_gaps() {
        let followers: Followers = [
            (
                [1; PSEUDONYM_LEN],
                vec![follower(1, &[]), follower(2, &["lab"])],
            ),
            ([2; PSEUDONYM_LEN], vec![follower(1, &[])]),
        ]
        .into();
        let changes = vec![
            Change::Put {
                key: key(1),
                value: pointer(&["medications"], 1),
                previous: None,
            },
            Change::Put {
                key: key(2),
                value: pointer(&["lab"], 2),
                previous: Some(pointer(&["lab"], 1)),
            },
            // A refresh: same content.
            Change::Put {
                key: key(2),
                value: pointer(&["lab"], 2),
                previous: Some(pointer(&["lab"], 2)),
            },
            Change::Delete {
                key: key(1),
                previous: pointer(&["lab"], 1),
                lapsed: true,
            },
            // Not followed.
            Change::Put {
                key: key(3),
                value: pointer(&["lab"], 1),
                previous: None,
            },
        ];
        let mut last = HashMap::from([([1; 16], 7)]);
        let events = events_for(&changes, &followers, 10, &mut last);
        let seen: Vec<(u8, u64, EventKind)> = events
            .iter()
            .map(|(s, n, e)| (s[0], *n, EventKind::try_from(e.kind).unwrap()))
            .collect();
        assert_eq!(
            seen,
            vec![
                (1, 8, EventKind::Appeared),
                (1, 9, EventKind::Changed),
                (1, 10, EventKind::Lapsed),
                (2, 1, EventKind::Lapsed),
            ]
        );
        assert_eq!(last[&[2; 16]], 1);
        assert_eq!(subscriptions(&changes, &followers), vec![[1; 16], [2; 16]]);
        // An expired follower gets nothing.
        assert!(events_for(&changes, &followers, 1_000, &mut last).is_empty());
    }
}
