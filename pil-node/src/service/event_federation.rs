//! Subscriptions across regions. The home node (where the organization subscribed)
//! registers each subscription with every peer that may hold one of its patients (by
//! the peer's routing summary; a peer without a current summary always may), which
//! decides it under its own legal configuration and makes events for its own pointers.
//! A peer whose summary comes to hold a followed patient later is registered then,
//! and delivers what it holds of that patient first; the home node collects them
//! into the subscriber's feed, moving its durable position per peer in the same write,
//! so a peer or home node that was down delivers what it owes when it is back, in
//! order, once. At delivery the home node asks every peer for the patients'
//! protections, which hold for every region's pointers.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use pil_proto::{ident::PatientId, v1};
use prost::Message;
use tonic::{Request, Response};

use super::{NodeService, events::parse_id, internal, invalid, unrecorded};
use crate::{
    access::{Blocked, Requester},
    audit::AuditRecord,
    error::Error,
    federation::PeerCallError,
    patient_keys::{PSEUDONYM_LEN, Pseudonym},
    pointer::{self, to_timestamp},
    registry::{NANOS_PER_DAY, now_nanos},
    store::{
        PeerState, StoredEvent, StoredSubscription, SubscriptionId,
        events::{EventKind, FollowedPatient},
    },
};

const NANOS_PER_MINUTE: i64 = 60_000_000_000;

/// How long a peer is given to register a subscription while the subscriber waits.
const REGISTER_DEADLINE: Duration = Duration::from_secs(3);
/// How long a pull waits at the peer for an event, and how long the home node waits
/// for its answer.
const PULL_WAIT_MS: u32 = 20_000;
const PULL_DEADLINE: Duration = Duration::from_secs(25);
/// Events collected per subscription per pull.
const PULL_PAGE: u32 = 500;
/// How long a delivery waits for a peer's protections.
const PROTECTIONS_DEADLINE: Duration = Duration::from_secs(3);
/// Most subscriptions one pull names.
const MAX_FEEDS: usize = 1000;
/// Pause after a failed pull, doubling up to the most.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MOST: Duration = Duration::from_secs(10);

/// What a token presented at subscribing or renewing lets the home node do at the
/// peers it has not reached yet. Kept in memory only: a credential is never stored.
#[derive(Clone)]
pub(super) struct Registration {
    access_token: String,
    client_organization_number: String,
    query_id: String,
    /// Past this, a peer not registered yet does not accept the token: it needs a
    /// renewal. A peer that comes to hold a patient later accepts it as of
    /// `presented_at`.
    token_expires: SystemTime,
    /// When this node verified the token, unix nanoseconds.
    presented_at: i64,
}

impl Registration {
    /// What `requester`'s call (on a certificate of `client_org`) lets be forwarded.
    pub(super) fn of(requester: &Requester, client_org: String, query_id: &str) -> Self {
        Self {
            access_token: requester.presented.clone(),
            client_organization_number: client_org,
            query_id: query_id.to_string(),
            token_expires: requester.token.expires_at,
            presented_at: now_nanos(),
        }
    }
}

/// The home node's side: registrations waiting for a peer, and a wake-up for the
/// collectors when subscriptions change.
#[derive(Default)]
pub struct Relay {
    waiting: Mutex<HashMap<SubscriptionId, Registration>>,
    /// The patients (by pseudonym) each peer was registered for, per subscription: a
    /// patient once sent stays sent.
    sent: Mutex<HashMap<(SubscriptionId, String), HashSet<Pseudonym>>>,
    changed: tokio::sync::Notify,
}

impl Relay {
    fn remember(&self, id: SubscriptionId, registration: Registration) {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, registration);
        self.changed.notify_waiters();
    }

    fn registration(&self, id: &SubscriptionId) -> Option<Registration> {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Subscriptions whose token this node still holds.
    fn registered(&self) -> Vec<SubscriptionId> {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    fn sent(&self, id: SubscriptionId, region: &str) -> HashSet<Pseudonym> {
        self.sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(id, region.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    fn mark_sent(
        &self,
        id: SubscriptionId,
        region: &str,
        patients: impl Iterator<Item = Pseudonym>,
    ) {
        self.sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((id, region.to_string()))
            .or_default()
            .extend(patients);
    }

    fn forget(&self, id: SubscriptionId) {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(s, _), _| *s != id);
    }
}

fn holds_nothing(region: &str) -> String {
    format!(
        "not told: {region}'s routing summary holds none of the followed patients; it is \
         registered there as soon as it may hold one"
    )
}

/// The region name under which a peer numbers the events it delivers first for
/// patients it came to hold after a subscription was made.
const CAME_TO_HOLD: &str = "(held before registration)";

/// Events read back to tell which changes were given already while a subscription
/// was being stored (only other nodes' writes of those few moments).
const MAX_MADE_MEANWHILE: usize = 10_000;

/// What a peer delivers first to a subscription registered with it for patients new
/// to it there.
struct CatchUp {
    id: SubscriptionId,
    /// When the home node began following them: changes since are delivered.
    since: Option<i64>,
    /// Also the live pointers changed before then (this region came to hold the
    /// patients after the subscription was made).
    live: bool,
    /// The subscription's newest event number here before it was stored.
    made_before: u64,
}

fn wire_kind(kind: v1::EventKind) -> EventKind {
    match kind {
        v1::EventKind::PointerAppeared => EventKind::Appeared,
        v1::EventKind::PointerChanged => EventKind::Changed,
        v1::EventKind::PointerRemoved => EventKind::Removed,
        v1::EventKind::PointerLapsed => EventKind::Lapsed,
        v1::EventKind::PatientUnfollowed => EventKind::Unfollowed,
        _ => EventKind::NotShown,
    }
}

/// The protections of one patient that hold for a subscriber, across regions.
#[derive(Debug, Default, Clone)]
pub(super) struct Protections {
    pub opted_out: bool,
    pub shut: crate::access::ShutOut,
}

impl NodeService {
    // The home node's side.

    /// Registers (or renews, or ends) `id` with every peer it should be, waiting
    /// briefly; peers not reached are tried again by the collectors.
    pub(super) async fn register_everywhere(
        &self,
        id: SubscriptionId,
        sub: &StoredSubscription,
        registration: Option<Registration>,
    ) {
        if let Some(registration) = registration {
            self.relay.remember(id, registration);
        }
        let calls = self
            .federation
            .regions()
            .into_iter()
            .map(|region| async move {
                if let Err(e) = self.register_at(&region, id, sub).await {
                    tracing::warn!(peer = %region, subscription = %hex::encode(id), error = %e, "subscription not registered");
                }
            });
        futures::future::join_all(calls).await;
        self.relay.changed.notify_waiters();
    }

    /// How `region` follows subscription `id`, if it was ever tried there.
    async fn peer_follow(
        &self,
        id: SubscriptionId,
        region: &str,
    ) -> Result<Option<crate::store::PeerFollow>, Error> {
        Ok(self
            .registry
            .peer_follows(id)
            .await
            .map_err(internal)?
            .into_iter()
            .find(|f| f.region == region))
    }

    /// Brings `region`'s part of subscription `id` to what it should be now.
    async fn register_at(
        &self,
        region: &str,
        id: SubscriptionId,
        sub: &StoredSubscription,
    ) -> Result<(), Error> {
        let follow = self.peer_follow(id, region).await?;
        let state = follow.as_ref().map_or(PeerState::Pending, |f| f.state());
        let said = follow.map(|f| f.detail).unwrap_or_default();
        let set = |state, detail: String| async move {
            self.registry
                .set_peer_follow(id, region, state, detail)
                .await
                .map_err(internal)
        };
        if sub.ended {
            if state != PeerState::Following {
                return Ok(());
            }
            let request = v1::ForwardedSubscribeRequest {
                subscription_id: hex::encode(id),
                ended: true,
                ..Default::default()
            };
            return match self
                .federation
                .subscribe_at(region, request, REGISTER_DEADLINE)
                .await
            {
                Ok(_) => set(PeerState::Ended, String::new()).await,
                Err(e) => Err(Error::unavailable(e.to_string())),
            };
        }
        // A peer that came to hold a patient since checks the token as of when it was
        // presented here; any other needs it unexpired.
        let late = matches!(state, PeerState::Following | PeerState::HoldsNothing);
        let registration = self
            .relay
            .registration(&id)
            .filter(|r| late || r.token_expires > SystemTime::now());
        let Some(registration) = registration else {
            if state == PeerState::Refused || state == PeerState::Ended {
                return Ok(());
            }
            if self.newly_held(region, id, sub).await {
                // Registered here for some patients, it stays so; otherwise pending.
                let (state, detail) = if state == PeerState::Following {
                    (
                        state,
                        format!(
                            "{region} came to hold another followed patient after this node \
                             restarted (the token presented is kept in memory only); renew the \
                             subscription to register it there"
                        ),
                    )
                } else {
                    (
                        PeerState::Pending,
                        format!(
                            "not registered in {region}: it was not reached while the token \
                             presented could be forwarded (or this node restarted since); \
                             renew the subscription to register it"
                        ),
                    )
                };
                if detail != said {
                    set(state, detail).await?;
                }
            } else if state == PeerState::Pending {
                set(PeerState::HoldsNothing, holds_nothing(region)).await?;
            }
            return Ok(());
        };
        // Only the patients the peer may hold: it is not told of the others.
        let sent = self.relay.sent(id, region);
        let followed = self.followed_patients(sub);
        let may = self.routing.router.may_hold(region, &followed).await;
        let chosen: Vec<(Pseudonym, PatientId)> = followed
            .into_iter()
            .zip(may)
            .filter(|((p, _), may)| *may || sent.contains(p))
            .map(|(p, _)| p)
            .collect();
        if chosen.is_empty() {
            if state != PeerState::Following {
                set(PeerState::HoldsNothing, holds_nothing(region)).await?;
            }
            return Ok(());
        }
        let patients = chosen
            .iter()
            .map(|(_, p)| v1::PatientIdentifier {
                system: p.system().to_string(),
                value: p.value().to_string(),
            })
            .collect();
        let request = v1::ForwardedSubscribeRequest {
            subscription_id: hex::encode(id),
            access_token: registration.access_token,
            client_organization_number: registration.client_organization_number,
            patients,
            categories: sub.categories.clone(),
            expires_at: Some(to_timestamp(sub.expires_at)),
            ended: false,
            query_id: registration.query_id,
            // Registered already (or told it held nothing): patients new to it came
            // to it since.
            came_to_hold: late,
            // Changes the peer made since then go first (it may have been out of
            // reach, or held nothing, when the subscription was made).
            followed_since: Some(to_timestamp(sub.created_at)),
            token_presented_at: late.then(|| to_timestamp(registration.presented_at)),
        };
        match self
            .federation
            .subscribe_at(region, request, REGISTER_DEADLINE)
            .await
        {
            Ok(answer) => {
                tracing::info!(peer = %region, subscription = %hex::encode(id), following = answer.following, "subscription registered");
                self.relay
                    .mark_sent(id, region, chosen.iter().map(|(p, _)| *p));
                let detail = match answer.journal_from {
                    Some(from) => {
                        let from = pointer::rfc3339(from.seconds * 1_000_000_000);
                        tracing::warn!(peer = %region, subscription = %hex::encode(id), "registered later than the peer keeps its changes; earlier changes may be missing");
                        format!(
                            "registered in {region} later than it keeps its changes: its \
                             live pointers were delivered, changes before {} may be missing",
                            from
                        )
                    }
                    None => String::new(),
                };
                set(PeerState::Following, detail).await
            }
            Err(PeerCallError::Refused(why)) => set(PeerState::Refused, why).await,
            Err(PeerCallError::Unavailable(why)) => {
                set(state, format!("{region} not reached yet: {why}")).await?;
                Err(Error::unavailable(why))
            }
        }
    }

    /// The followed patients (not stopped), by this node's pseudonym.
    fn followed_patients(&self, sub: &StoredSubscription) -> Vec<(Pseudonym, PatientId)> {
        sub.patients
            .iter()
            .filter(|p| !p.stopped)
            .filter_map(|p| {
                let pseudonym = Pseudonym::try_from(p.pseudonym.as_slice()).ok()?;
                let (system, value) = self.registry.open_sealed(&p.sealed, &pseudonym).ok()?;
                Some((pseudonym, PatientId::parse(&system, &value, true).ok()?))
            })
            .collect()
    }

    /// Whether `region`'s summary may now hold a followed patient it was not
    /// registered for.
    async fn newly_held(&self, region: &str, id: SubscriptionId, sub: &StoredSubscription) -> bool {
        let sent = self.relay.sent(id, region);
        let unsent: Vec<(Pseudonym, PatientId)> = self
            .followed_patients(sub)
            .into_iter()
            .filter(|(p, _)| !sent.contains(p))
            .collect();
        !unsent.is_empty()
            && self
                .routing
                .router
                .may_hold(region, &unsent)
                .await
                .into_iter()
                .any(|m| m)
    }

    /// Registers subscriptions with the peers that come to hold their patients, for as
    /// long as the node serves: looked at whenever a peer's summary grows.
    pub async fn run_late_registrations(self) {
        loop {
            let grown = self.routing.router.grown().notified();
            tokio::pin!(grown);
            grown.as_mut().enable();
            let _ = tokio::time::timeout(Duration::from_secs(5), grown).await;
            // Growth comes in bursts; one look covers a burst.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Err(e) = self.register_late().await {
                tracing::warn!(error = %e, "subscriptions not registered with the regions that came to hold their patients");
            }
        }
    }

    async fn register_late(&self) -> Result<(), Error> {
        let now = now_nanos();
        let mut any = false;
        for id in self.relay.registered() {
            let Some(sub) = self.registry.subscription(id).await.map_err(internal)? else {
                continue;
            };
            if !sub.home.is_empty() || !sub.current(now) {
                if sub.ended {
                    self.relay.forget(id);
                }
                continue;
            }
            let follows = self.registry.peer_follows(id).await.map_err(internal)?;
            for region in self.federation.regions() {
                let state = follows
                    .iter()
                    .find(|f| f.region == region)
                    .map_or(PeerState::Pending, |f| f.state());
                if !matches!(state, PeerState::Following | PeerState::HoldsNothing)
                    || !self.newly_held(&region, id, &sub).await
                {
                    continue;
                }
                tracing::info!(peer = %region, subscription = %hex::encode(id), "a region came to hold a followed patient; registering the subscription there");
                if let Err(e) = self.register_at(&region, id, &sub).await {
                    tracing::warn!(peer = %region, subscription = %hex::encode(id), error = %e, "subscription not registered");
                }
                any = true;
            }
        }
        if any {
            self.relay.changed.notify_waiters();
        }
        Ok(())
    }

    /// Collects the events of this node's subscriptions from every peer, for as long
    /// as the node serves: one task per peer, started and stopped as peers change.
    pub async fn run_collectors(self) {
        // Aborted with this task (when the node stops), so none outlives the store.
        struct Collector(tokio::task::JoinHandle<()>);
        impl Drop for Collector {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let mut running: HashMap<String, Collector> = HashMap::new();
        loop {
            let regions = self.federation.regions();
            running.retain(|region, task| regions.contains(region) && !task.0.is_finished());
            for region in regions {
                if let std::collections::hash_map::Entry::Vacant(slot) = running.entry(region) {
                    let service = self.clone();
                    let name = slot.key().clone();
                    slot.insert(Collector(tokio::spawn(async move {
                        service.collect_from(name).await
                    })));
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn collect_from(&self, region: String) {
        let mut retry = RETRY_FIRST;
        loop {
            let changed = self.relay.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let positions = match self.positions_at(&region).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(peer = %region, error = %e, "subscriptions not read");
                    tokio::time::sleep(retry).await;
                    continue;
                }
            };
            if positions.is_empty() {
                tokio::select! {
                    _ = &mut changed => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            }
            let request = v1::ForwardedPullEventsRequest {
                positions: positions.clone(),
                max_events: PULL_PAGE,
                wait_ms: PULL_WAIT_MS,
            };
            let answer = tokio::select! {
                a = self.federation.pull_from(&region, request, PULL_DEADLINE) => a,
                // A new subscription is pulled for at once.
                _ = &mut changed => continue,
            };
            match answer {
                Ok(answer) => {
                    retry = RETRY_FIRST;
                    if let Err(e) = self.store_collected(&region, &positions, answer).await {
                        tracing::warn!(peer = %region, error = %e, "collected events not stored");
                        tokio::time::sleep(retry).await;
                    }
                }
                Err(e) => {
                    tracing::debug!(peer = %region, error = %e, "events not collected");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MOST);
                }
            }
        }
    }

    /// Where this node stands at `region` in each subscription registered there,
    /// registering those that are not yet.
    async fn positions_at(&self, region: &str) -> Result<Vec<v1::FeedPosition>, Error> {
        let keep_for =
            i64::from(self.access.legal().settings().subscriptions.events_days) * NANOS_PER_DAY;
        let now = now_nanos();
        let mut out = Vec::new();
        for (id, sub) in self.registry.all_subscriptions().await.map_err(internal)? {
            // Made here, and not long over: a peer's events made before it ended are
            // still collected.
            if !sub.home.is_empty() || sub.expires_at.saturating_add(keep_for) < now {
                continue;
            }
            let follow = self.peer_follow(id, region).await?;
            let state = follow.as_ref().map_or(PeerState::Pending, |f| f.state());
            if state == PeerState::Pending || (sub.ended && state == PeerState::Following) {
                // Not reached yet, or to be ended there: the pull waits for no one.
                let _ = self.register_at(region, id, &sub).await;
            }
            if let Some(f) = follow
                && matches!(f.state(), PeerState::Following | PeerState::Ended)
                && out.len() < MAX_FEEDS
            {
                out.push(v1::FeedPosition {
                    subscription_id: hex::encode(id),
                    after: f.position,
                });
            }
        }
        Ok(out)
    }

    /// Stores what a pull brought, each subscription's events with its new position.
    async fn store_collected(
        &self,
        region: &str,
        positions: &[v1::FeedPosition],
        answer: v1::ForwardedPullEventsResponse,
    ) -> Result<(), Error> {
        let asked: HashMap<&str, u64> = positions
            .iter()
            .map(|p| (p.subscription_id.as_str(), p.after))
            .collect();
        for feed in answer.feeds {
            let Some(&from) = asked.get(feed.subscription_id.as_str()) else {
                continue;
            };
            let id = parse_id(&feed.subscription_id)?;
            if !feed.error.is_empty() {
                tracing::warn!(peer = %region, subscription = %feed.subscription_id, error = %feed.error, "peer could not give events");
                let state = self
                    .peer_follow(id, region)
                    .await?
                    .map_or(PeerState::Pending, |f| f.state());
                self.registry
                    .set_peer_follow(id, region, state, feed.error)
                    .await
                    .map_err(internal)?;
                continue;
            }
            let Some(to) = feed.events.last().map(|e| e.number) else {
                continue;
            };
            let Some(sub) = self.registry.subscription(id).await.map_err(internal)? else {
                continue;
            };
            let mut collected = Vec::with_capacity(feed.events.len());
            for event in feed.events {
                let Some(p) = event.patient.as_ref() else {
                    continue;
                };
                let Ok(patient) = PatientId::parse(&p.system, &p.value, true) else {
                    continue;
                };
                let pseudonym = self.registry.pseudonym(&patient);
                // A patient no longer followed here gets nothing more from anywhere.
                if !sub.patients.iter().any(|f| f.is(&pseudonym) && !f.stopped) {
                    continue;
                }
                let at = pointer::timestamp("time", event.time.as_ref())
                    .ok()
                    .flatten()
                    .unwrap_or_else(now_nanos);
                collected.push(StoredEvent {
                    kind: wire_kind(event.kind()) as i32,
                    key: pseudonym.to_vec(),
                    pointer: None,
                    at,
                    region: region.to_string(),
                    shown: event.pointer.map(|p| p.encode_to_vec()).unwrap_or_default(),
                    origin_number: event.number,
                    previous_categories: Vec::new(),
                });
            }
            let n = collected.len();
            if self
                .registry
                .collect_events(id, region, from, to, collected)
                .await
                .map_err(internal)?
            {
                tracing::debug!(peer = %region, subscription = %feed.subscription_id, events = n, "events collected");
            }
        }
        Ok(())
    }

    /// Every peer's protections for `patients` that hold for the subscriber; refused
    /// when a peer cannot be asked, as a lookup shows nothing then.
    pub(super) async fn protections_elsewhere(
        &self,
        id: SubscriptionId,
        blocked: &Blocked<'_>,
        patients: &[(Pseudonym, (String, String))],
        query_id: &str,
    ) -> Result<BTreeMap<Pseudonym, Protections>, Error> {
        let mut out: BTreeMap<Pseudonym, Protections> = BTreeMap::new();
        if patients.is_empty() || self.federation.regions().is_empty() {
            return Ok(out);
        }
        let request = |asked: &[&(Pseudonym, (String, String))]| v1::ForwardedProtectionsRequest {
            subscription_id: hex::encode(id),
            patients: asked
                .iter()
                .map(|(_, (system, value))| v1::PatientIdentifier {
                    system: system.clone(),
                    value: value.clone(),
                })
                .collect(),
            organization_number: blocked.organization.to_string(),
            child_organization_number: blocked.child_organization.unwrap_or("").to_string(),
            hpr_number: blocked.hpr_number.unwrap_or("").to_string(),
            profession: blocked.profession.unwrap_or("").to_string(),
            query_id: query_id.to_string(),
        };
        // Each region is asked only about the patients its summary may hold (its
        // summary covers its blocks and opt-outs too).
        let identified: Vec<(Pseudonym, PatientId)> = patients
            .iter()
            .filter_map(|(p, (system, value))| {
                Some((*p, PatientId::parse(system, value, true).ok()?))
            })
            .collect();
        let mut asks = Vec::new();
        let mut asked_of: HashMap<String, Vec<Pseudonym>> = HashMap::new();
        for region in self.federation.regions() {
            let may = if identified.len() == patients.len() {
                self.routing.router.may_hold(&region, &identified).await
            } else {
                vec![true; patients.len()]
            };
            let asked: Vec<&(Pseudonym, (String, String))> = patients
                .iter()
                .zip(may)
                .filter_map(|(p, may)| may.then_some(p))
                .collect();
            if asked.is_empty() {
                continue;
            }
            asked_of.insert(region.clone(), asked.iter().map(|(p, _)| *p).collect());
            asks.push((region, request(&asked)));
        }
        let mut unchecked = Vec::new();
        for (region, answer) in self
            .federation
            .protections_from(asks, PROTECTIONS_DEADLINE)
            .await
        {
            let asked = asked_of.remove(&region).unwrap_or_default();
            match answer {
                Ok(answer) if answer.patients.len() == asked.len() => {
                    for (pseudonym, p) in asked.iter().zip(answer.patients) {
                        let mine = out.entry(*pseudonym).or_default();
                        mine.opted_out |= p.opted_out;
                        mine.shut.merge(p.blocked_all_holders, p.blocked_holders);
                    }
                }
                Ok(_) => unchecked.push(format!("{region} (an answer of the wrong length)")),
                Err(e) => unchecked.push(format!("{region} ({e})")),
            }
        }
        if !unchecked.is_empty() {
            return Err(Error::unavailable(format!(
                "the events wait: the patients' blocks and opt-outs registered in {} could not \
                 be checked, and they hold for every region's pointers; retry when the region \
                 answers",
                unchecked.join(", ")
            )));
        }
        Ok(out)
    }

    // The peer's side.

    pub(super) async fn forwarded_subscribe_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ForwardedSubscribeRequest>,
    ) -> Result<Response<v1::ForwardedSubscribeResponse>, Error> {
        let region = self.peer_region(&req)?;
        entry.forwarded_by = Some(region.clone());
        let r = req.into_inner();
        super::federation::take_query_id(entry, &r.query_id);
        let id = parse_id(&r.subscription_id)?;
        let existing = self.registry.subscription(id).await.map_err(internal)?;
        if let Some(s) = &existing
            && s.home != region
        {
            return Err(Error::denied(format!(
                "subscription {} was not registered here by region {region}",
                r.subscription_id
            )));
        }
        if r.ended {
            entry.detail = Some(format!("subscription {} ended", r.subscription_id));
            if let Some(mut s) = existing {
                s.ended = true;
                self.registry
                    .put_subscription(id, s)
                    .await
                    .map_err(internal)?;
            }
            return Ok(Response::new(v1::ForwardedSubscribeResponse::default()));
        }
        // A late registration's token is checked as of when the home node verified
        // it, at most max_days ago, and the subscription lasts at most max_days from
        // then.
        let max_days = i64::from(self.access.legal().settings().subscriptions.max_days.max(1));
        let presented_at = if r.came_to_hold {
            pointer::timestamp("token_presented_at", r.token_presented_at.as_ref())
                .map_err(invalid)?
        } else {
            None
        };
        if let Some(at) = presented_at
            && (at < now_nanos() - max_days * NANOS_PER_DAY || at > now_nanos() + NANOS_PER_MINUTE)
        {
            return Err(Error::invalid(format!(
                "token_presented_at: the token must have been presented to the home node \
                 within the last {max_days} days ([subscriptions] max_days here); renew the \
                 subscription with a fresh token"
            )));
        }
        let requester = self.forwarded_requester_at(
            &region,
            &r.client_organization_number,
            &r.access_token,
            presented_at.map(|at| UNIX_EPOCH + Duration::from_nanos(at.max(0) as u64)),
        )?;
        if let Some(s) = &existing
            && s.owner != requester.token.org_number
        {
            return Err(Error::denied(format!(
                "subscription {} belongs to another organization",
                r.subscription_id
            )));
        }
        if r.patients.len() > super::events::MAX_PATIENTS {
            return Err(Error::invalid(format!(
                "patients: at most {} per subscription",
                super::events::MAX_PATIENTS
            )));
        }
        let most = self.may_follow(&requester, entry, 0)?;
        let most = match presented_at {
            Some(at) => most.min(at + max_days * NANOS_PER_DAY),
            None => most,
        };
        let home_expiry = pointer::timestamp("expires_at", r.expires_at.as_ref())
            .map_err(invalid)?
            .unwrap_or(most);
        let mut patients: BTreeMap<Pseudonym, FollowedPatient> = BTreeMap::new();
        let mut newcomers = Vec::new();
        for (i, p) in r.patients.iter().enumerate() {
            let patient = pointer::patient(Some(p), self.config.test_data)
                .map_err(|e| Error::invalid(format!("patients[{i}]: {e}")))?;
            if !requester.covers(&patient) {
                continue;
            }
            let pseudonym = self.registry.pseudonym(&patient);
            // Stopped here stays stopped.
            let stopped = existing
                .as_ref()
                .is_some_and(|s| s.patients.iter().any(|f| f.is(&pseudonym) && f.stopped));
            let known = existing
                .as_ref()
                .is_some_and(|s| s.patients.iter().any(|f| f.is(&pseudonym)));
            if r.came_to_hold && !known {
                newcomers.push(patient.clone());
            }
            patients.insert(pseudonym, self.registry.follow(&patient, stopped));
        }
        let sub = StoredSubscription {
            owner: requester.token.org_number.clone(),
            requester: super::events::subscriber_json(&requester)?,
            categories: pointer::category_list("categories", &r.categories, false)
                .map_err(invalid)?,
            patients: patients.into_values().collect(),
            created_at: existing.as_ref().map_or(now_nanos(), |s| s.created_at),
            expires_at: home_expiry.min(most),
            ended: false,
            home: region.clone(),
        };
        self.record_following(entry, id, &sub).await?;
        let since =
            pointer::timestamp("followed_since", r.followed_since.as_ref()).map_err(invalid)?;
        // The changes to patients new here go first: no write of this node runs
        // between the subscription's storing and their delivery.
        let catch_up = !newcomers.is_empty() && (r.came_to_hold || since.is_some());
        let _alone = if catch_up {
            Some(self.registry.sole_turn().await)
        } else {
            None
        };
        let made_before = if catch_up {
            self.registry
                .events(id, u64::MAX, 0)
                .await
                .map_err(internal)?
                .last
        } else {
            0
        };
        self.registry
            .put_subscription(id, sub.clone())
            .await
            .map_err(internal)?;
        let mut journal_from = None;
        if catch_up {
            let caught = CatchUp {
                id,
                since,
                live: r.came_to_hold,
                made_before,
            };
            match self.deliver_held(&caught, &sub, &newcomers).await {
                Ok(from) => journal_from = from,
                Err(e) => {
                    // Back to what it was, so that the home node's retry delivers them
                    // again.
                    let back = existing.unwrap_or(StoredSubscription {
                        ended: true,
                        ..sub.clone()
                    });
                    let _ = self.registry.put_subscription(id, back).await;
                    return Err(e);
                }
            }
        }
        let following = sub.patients.iter().filter(|p| !p.stopped).count() as u32;
        entry.detail = Some(format!(
            "subscription {} of region {region}: {following} patients",
            r.subscription_id
        ));
        Ok(Response::new(v1::ForwardedSubscribeResponse {
            following,
            expires_at: Some(to_timestamp(sub.expires_at)),
            journal_from: journal_from.map(to_timestamp),
        }))
    }

    /// Delivers to a subscription what this region made of `patients` (new to it
    /// here) before it was registered: each change since the home node began
    /// following them, from the journal, in order; with `live`, first every live
    /// pointer the journal shows no change of since then, as appeared. Numbered
    /// before any change after. Returns when the journal begins, when it no longer
    /// reaches back that far (changes before then may be missing).
    async fn deliver_held(
        &self,
        catch_up: &CatchUp,
        sub: &StoredSubscription,
        patients: &[PatientId],
    ) -> Result<Option<i64>, Error> {
        let now = now_nanos();
        let id = catch_up.id;
        let mut first = Vec::new();
        let mut changes = Vec::new();
        let mut short_from = None;
        for patient in patients {
            let journal = match catch_up.since {
                Some(since) => {
                    let journal = self
                        .registry
                        .journal(patient, since)
                        .await
                        .map_err(internal)?;
                    if journal.complete_from > since {
                        short_from = Some(journal.complete_from);
                    }
                    journal.events
                }
                None => Vec::new(),
            };
            if catch_up.live {
                // A pointer is one endpoint of one organization, under whichever key.
                let journaled: HashSet<&[u8]> = journal
                    .iter()
                    .filter_map(|e| e.key.get(PSEUDONYM_LEN..))
                    .collect();
                for (key, pointer) in self.registry.live_stored(patient).await.map_err(internal)? {
                    let encoded = key.encode();
                    if journaled.contains(&encoded[PSEUDONYM_LEN..]) {
                        continue;
                    }
                    let appeared = StoredEvent {
                        kind: EventKind::Appeared as i32,
                        key: encoded.to_vec(),
                        pointer: Some(pointer),
                        at: now,
                        ..Default::default()
                    };
                    if appeared.concerns(&sub.categories) {
                        first.push(appeared);
                    }
                }
            }
            changes.extend(journal.into_iter().filter(|e| e.concerns(&sub.categories)));
        }
        // On a store several nodes share, another node's write may have made its
        // event since the subscription was stored: that change is not given twice.
        let made = self
            .registry
            .events(id, catch_up.made_before, MAX_MADE_MEANWHILE)
            .await
            .map_err(internal)?;
        let already: HashSet<(i32, &[u8], i64)> = made
            .events
            .iter()
            .map(|(_, e)| (e.kind, e.key.as_slice(), e.at))
            .collect();
        changes.retain(|e| !already.contains(&(e.kind, e.key.as_slice(), e.at)));
        changes.sort_by_key(|e| e.at);
        let events: Vec<StoredEvent> = first
            .into_iter()
            .chain(changes.into_iter().map(|e| StoredEvent {
                previous_categories: Vec::new(),
                ..e
            }))
            .collect();
        if events.is_empty() {
            return Ok(short_from);
        }
        let from = self
            .registry
            .peer_follows(id)
            .await
            .map_err(internal)?
            .into_iter()
            .find(|f| f.region == CAME_TO_HOLD)
            .map_or(0, |f| f.position);
        let n = events.len() as u64;
        let stored = self
            .registry
            .collect_events(id, CAME_TO_HOLD, from, from + n, events)
            .await
            .map_err(internal)?;
        if !stored {
            return Err(Error::unavailable(format!(
                "subscription {} was being registered here by another node at the same time; \
                 retry",
                hex::encode(id)
            )));
        }
        Ok(short_from)
    }

    pub(super) async fn forwarded_pull_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ForwardedPullEventsRequest>,
    ) -> Result<Response<v1::ForwardedPullEventsResponse>, Error> {
        let region = self.peer_region(&req)?;
        entry.forwarded_by = Some(region.clone());
        let r = req.into_inner();
        if r.positions.len() > MAX_FEEDS {
            return Err(Error::invalid(format!(
                "positions: {} named, at most {MAX_FEEDS} per pull",
                r.positions.len()
            )));
        }
        let limit = match r.max_events as usize {
            0 => 100,
            n => n.min(1000),
        };
        let wait = Duration::from_millis(u64::from(r.wait_ms.min(30_000)));
        let until = tokio::time::Instant::now() + wait;
        let writes = self.registry.writes();
        loop {
            let written = writes.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            let mut feeds = Vec::with_capacity(r.positions.len());
            let mut any = false;
            for position in &r.positions {
                let feed = self.feed(entry, &region, position, limit).await;
                any |= !feed.events.is_empty();
                feeds.push(feed);
            }
            if any || tokio::time::Instant::now() >= until {
                entry.detail = Some(format!(
                    "{} events of {} subscriptions",
                    feeds.iter().map(|f| f.events.len()).sum::<usize>(),
                    feeds.len()
                ));
                return Ok(Response::new(v1::ForwardedPullEventsResponse { feeds }));
            }
            tokio::select! {
                _ = &mut written => {}
                _ = tokio::time::sleep_until(until.min(tokio::time::Instant::now() + super::events::STREAM_POLL)) => {}
            }
        }
    }

    /// One subscription's events for the home node of `region`.
    async fn feed(
        &self,
        entry: &AuditRecord,
        region: &str,
        position: &v1::FeedPosition,
        limit: usize,
    ) -> v1::Feed {
        let mut feed = v1::Feed {
            subscription_id: position.subscription_id.clone(),
            ..Default::default()
        };
        let delivered = async {
            let id = parse_id(&position.subscription_id)?;
            let sub = match self.registry.subscription(id).await.map_err(internal)? {
                Some(s) if s.home == region => s,
                _ => {
                    return Err(Error::not_found(format!(
                        "no subscription {} registered here by region {region}",
                        position.subscription_id
                    )));
                }
            };
            self.deliver(entry, id, sub, position.after, limit, false)
                .await
        }
        .await;
        match delivered {
            Ok((events, last)) => {
                feed.events = events;
                feed.last_event = last;
            }
            Err(e) => feed.error = e.to_string(),
        }
        feed
    }

    pub(super) async fn forwarded_protections_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ForwardedProtectionsRequest>,
    ) -> Result<Response<v1::ForwardedProtectionsResponse>, Error> {
        let region = self.peer_region(&req)?;
        entry.forwarded_by = Some(region.clone());
        let r = req.into_inner();
        if r.patients.len() > super::events::MAX_PATIENTS {
            return Err(Error::invalid(format!(
                "patients: at most {} per call",
                super::events::MAX_PATIENTS
            )));
        }
        let none_if_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let (child, hpr, profession) = (
            none_if_empty(&r.child_organization_number),
            none_if_empty(&r.hpr_number),
            none_if_empty(&r.profession),
        );
        let blocked = Blocked {
            organization: &r.organization_number,
            child_organization: child.as_deref(),
            hpr_number: hpr.as_deref(),
            profession: profession.as_deref(),
        };
        let mut patients = Vec::with_capacity(r.patients.len());
        let mut records = Vec::with_capacity(r.patients.len());
        for (i, p) in r.patients.iter().enumerate() {
            let patient = pointer::patient(Some(p), self.config.test_data)
                .map_err(|e| Error::invalid(format!("patients[{i}]: {e}")))?;
            let (opt_out, blocks) = self
                .registry
                .protections(&patient)
                .await
                .map_err(internal)?;
            let shut = blocked.shut_out(&blocks);
            let mut record = entry.clone();
            record.patient = Some(hex::encode(self.registry.pseudonym(&patient)));
            record.outcome.status = "OK".into();
            record.detail = Some(format!(
                "protections for the delivery of subscription {} by region {region}, to \
                 organization {}",
                r.subscription_id, r.organization_number
            ));
            records.push(record);
            patients.push(v1::PatientProtections {
                patient: Some(p.clone()),
                opted_out: opt_out.is_some(),
                blocked_all_holders: shut.all_holders,
                blocked_holders: shut.holders.into_iter().collect(),
            });
        }
        // Recorded before the answer leaves, all at once so they share group commits.
        futures::future::try_join_all(records.into_iter().map(|r| self.audit.append(r)))
            .await
            .map_err(unrecorded)?;
        entry.detail = Some(format!(
            "protections of {} patients for subscription {}",
            patients.len(),
            r.subscription_id
        ));
        Ok(Response::new(v1::ForwardedProtectionsResponse { patients }))
    }
}
