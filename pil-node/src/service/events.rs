//! `EventService`: organizations follow patients' pointers, and the events their
//! changes make are delivered, decided again at delivery as a lookup would be.

use std::{collections::BTreeMap, pin::Pin, time::Duration};

use futures::Stream;
use pil_proto::{ident::PatientId, v1};
use prost::Message;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::{NodeService, denied, event_federation::Registration, internal, unrecorded};
use crate::{
    access::{Blocked, Requester},
    audit::{
        AuditRecord,
        record::{Action, RequesterInfo},
        rule_infos,
    },
    error::Error,
    lookup,
    patient_keys::Pseudonym,
    pointer::{self, to_timestamp},
    registry::{NANOS_PER_DAY, now_nanos},
    store::{
        PeerState, StoredEvent, StoredSubscription, SubscriptionId,
        events::{EventKind, FollowedPatient},
    },
};

/// Most patients one subscription follows.
pub(super) const MAX_PATIENTS: usize = 1000;
/// Events per pull unless asked otherwise, and at most.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// How often a stream looks for events written through other nodes of the region.
pub(super) const STREAM_POLL: Duration = Duration::from_millis(500);
const DEFAULT_HEARTBEAT_SECS: u32 = 15;

/// Who subscribed, as every delivery is decided for: the legal facts of their token
/// and the identities a block may name.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Subscriber {
    facts: pil_legal::Requester,
    who: RequesterInfo,
}

impl Subscriber {
    fn of(requester: &Requester) -> Self {
        Self {
            facts: requester.facts.clone(),
            who: RequesterInfo::from(requester),
        }
    }

    fn blocked(&self) -> Blocked<'_> {
        Blocked {
            organization: &self.who.organization,
            child_organization: self.who.child_organization.as_deref(),
            hpr_number: self.who.hpr_number.as_deref(),
            profession: self.who.profession.as_deref(),
        }
    }
}

/// What a subscription keeps of the requester who made or renewed it.
pub(super) fn subscriber_json(requester: &Requester) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(&Subscriber::of(requester)).map_err(Error::internal)
}

pub(super) fn parse_id(id: &str) -> Result<SubscriptionId, Error> {
    hex::decode(id)
        .ok()
        .and_then(|b| SubscriptionId::try_from(b.as_slice()).ok())
        .ok_or_else(|| {
            Error::invalid(format!(
                "subscription_id: `{id}` is not a subscription id (32 hexadecimal digits, as \
                 Subscribe answered)"
            ))
        })
}

fn event_kind(kind: i32) -> v1::EventKind {
    match EventKind::try_from(kind) {
        Ok(EventKind::Appeared) => v1::EventKind::PointerAppeared,
        Ok(EventKind::Changed) => v1::EventKind::PointerChanged,
        Ok(EventKind::Removed) => v1::EventKind::PointerRemoved,
        Ok(EventKind::Lapsed) => v1::EventKind::PointerLapsed,
        Ok(EventKind::Unfollowed) => v1::EventKind::PatientUnfollowed,
        Ok(EventKind::NotShown) => v1::EventKind::NotShown,
        _ => v1::EventKind::Unspecified,
    }
}

impl NodeService {
    /// The subscription `id`, if the caller's organization owns it.
    async fn owned(&self, id: SubscriptionId, org: &str) -> Result<StoredSubscription, Error> {
        match self.registry.subscription(id).await.map_err(internal)? {
            None => Err(Error::not_found(format!(
                "no subscription {} at this node",
                hex::encode(id)
            ))),
            Some(s) if !s.home.is_empty() => Err(Error::not_found(format!(
                "subscription {} was made at region {}; read, renew or end it there",
                hex::encode(id),
                s.home
            ))),
            Some(s) if s.owner != org => Err(Error::denied(format!(
                "subscription {} belongs to another organization; only the organization \
                 that subscribed may read, renew or end it",
                hex::encode(id)
            ))),
            Some(s) => Ok(s),
        }
    }

    /// The number of the subscription's newest event.
    async fn last_event(&self, id: SubscriptionId) -> Result<u64, Error> {
        Ok(self
            .registry
            .events(id, u64::MAX, 0)
            .await
            .map_err(internal)?
            .last)
    }

    /// The identifiers of the patients `s` follows now.
    pub(super) fn followed_identifiers(
        &self,
        s: &StoredSubscription,
    ) -> Vec<v1::PatientIdentifier> {
        s.patients
            .iter()
            .filter(|p| !p.stopped)
            .filter_map(|p| {
                let pseudonym = Pseudonym::try_from(p.pseudonym.as_slice()).ok()?;
                let (system, value) = self.registry.open_sealed(&p.sealed, &pseudonym).ok()?;
                Some(v1::PatientIdentifier { system, value })
            })
            .collect()
    }

    /// The subscription as its owner sees it, with how every other region follows it.
    async fn view(
        &self,
        id: SubscriptionId,
        s: &StoredSubscription,
        last: u64,
    ) -> Result<v1::Subscription, Error> {
        let follows = self.registry.peer_follows(id).await.map_err(internal)?;
        let regions = self
            .federation
            .regions()
            .into_iter()
            .map(|region| {
                let f = follows.iter().find(|f| f.region == region);
                let state = match f.map(|f| f.state()) {
                    None | Some(PeerState::Pending) => v1::RegionFollowingState::Pending,
                    Some(PeerState::Following) => v1::RegionFollowingState::Following,
                    Some(PeerState::Refused) => v1::RegionFollowingState::Refused,
                    Some(PeerState::Ended) => v1::RegionFollowingState::Ended,
                    Some(PeerState::HoldsNothing) => v1::RegionFollowingState::HoldsNothing,
                };
                v1::RegionFollowing {
                    region,
                    state: state as i32,
                    detail: f.map(|f| f.detail.clone()).unwrap_or_default(),
                    collected: f.map_or(0, |f| f.position),
                }
            })
            .collect();
        let patients = self.followed_identifiers(s);
        Ok(v1::Subscription {
            id: hex::encode(id),
            organization_number: s.owner.clone(),
            patients,
            categories: s.categories.clone(),
            created_at: Some(to_timestamp(s.created_at)),
            expires_at: Some(to_timestamp(s.expires_at)),
            ended: s.ended,
            last_event: last,
            legal_basis: self
                .access
                .legal()
                .settings()
                .subscriptions
                .legal_basis
                .clone(),
            regions,
        })
    }

    /// Decides whether `requester` may follow patients at all, as a lookup's search is
    /// decided, and for how long.
    pub(super) fn may_follow(
        &self,
        requester: &Requester,
        entry: &mut AuditRecord,
        days: u32,
    ) -> Result<i64, Error> {
        entry.requester = Some(RequesterInfo::from(requester));
        let legal = self.access.legal();
        let search = legal.decide_lookup(&requester.facts);
        entry.decision.rules = rule_infos(&search.rules);
        if !search.allowed {
            entry.decision.outcome = "denied".into();
            return Err(denied(&search));
        }
        if search.emergency {
            entry.decision.outcome = "denied".into();
            return Err(Error::denied(
                "emergency access (purpose ETREAT) is for one lookup at a time; it does not \
                 allow following a patient",
            ));
        }
        entry.decision.outcome = "allowed".into();
        let max = legal.settings().subscriptions.max_days.max(1);
        let days = if days == 0 { max } else { days.min(max) };
        Ok(now_nanos() + i64::from(days) * NANOS_PER_DAY)
    }

    /// One record per followed patient, before the subscription is stored: the
    /// patient's report shows who follows them.
    pub(super) async fn record_following(
        &self,
        entry: &AuditRecord,
        id: SubscriptionId,
        sub: &StoredSubscription,
    ) -> Result<(), Error> {
        let until = pointer::rfc3339(sub.expires_at);
        for p in sub.patients.iter().filter(|p| !p.stopped) {
            let mut r = entry.clone();
            r.patient = Some(hex::encode(&p.pseudonym));
            r.outcome.status = "OK".into();
            r.detail = Some(format!(
                "subscription {} follows the patient's pointers until {}",
                hex::encode(id),
                until
            ));
            self.audit.append(r).await.map_err(unrecorded)?;
        }
        Ok(())
    }

    async fn subscribe_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::SubscribeRequest>,
    ) -> Result<Response<v1::SubscribeResponse>, Error> {
        let requester = self
            .requester_once(&req, "/pil.v1.EventService/Subscribe")
            .await?;
        let cert_org = self.organization(&req)?.to_string();
        let req = req.into_inner();
        if req.patients.is_empty() {
            return Err(Error::invalid(
                "patients: name at least one patient to follow",
            ));
        }
        if req.patients.len() > MAX_PATIENTS {
            return Err(Error::invalid(format!(
                "patients: {} named, at most {MAX_PATIENTS} per subscription; subscribe in parts",
                req.patients.len()
            )));
        }
        let mut patients: Vec<PatientId> = Vec::with_capacity(req.patients.len());
        for (i, p) in req.patients.iter().enumerate() {
            let patient = pointer::patient(Some(p), self.config.test_data)
                .map_err(|e| Error::invalid(format!("patients[{i}]: {e}")))?;
            patients.push(patient);
        }
        let categories =
            pointer::category_list("categories", &req.categories, false).map_err(super::invalid)?;
        let expires_at = self.may_follow(&requester, entry, req.days)?;
        let mut followed: BTreeMap<Pseudonym, FollowedPatient> = BTreeMap::new();
        let mut refused = Vec::new();
        for patient in patients {
            if !requester.covers(&patient) {
                refused.push(v1::NotFollowed {
                    patient: Some(v1::PatientIdentifier {
                        system: patient.system().to_string(),
                        value: patient.value().to_string(),
                    }),
                    reason: "the access token's attest names other patients".into(),
                });
                continue;
            }
            let pseudonym = self.registry.pseudonym(&patient);
            followed.insert(pseudonym, self.registry.follow(&patient, false));
        }
        if followed.is_empty() {
            entry.decision.outcome = "denied".into();
            return Err(Error::denied(
                "none of the patients can be followed: the access token's attest names \
                 other patients",
            ));
        }
        let id: SubscriptionId = rand::random();
        let sub = StoredSubscription {
            owner: requester.token.org_number.clone(),
            requester: subscriber_json(&requester)?,
            categories,
            patients: followed.into_values().collect(),
            created_at: now_nanos(),
            expires_at,
            ended: false,
            home: String::new(),
        };
        self.record_following(entry, id, &sub).await?;
        self.registry
            .put_subscription(id, sub.clone())
            .await
            .map_err(internal)?;
        entry.detail = Some(format!(
            "subscription {}: {} patients",
            hex::encode(id),
            sub.patients.len()
        ));
        tracing::info!(caller = %sub.owner, subscription = %hex::encode(id), patients = sub.patients.len(), "subscribed");
        let forward = Registration::of(&requester, cert_org, &entry.query_id);
        self.register_everywhere(id, &sub, Some(forward)).await;
        Ok(Response::new(v1::SubscribeResponse {
            subscription: Some(self.view(id, &sub, 0).await?),
            refused,
        }))
    }

    async fn renew_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::RenewSubscriptionRequest>,
    ) -> Result<Response<v1::RenewSubscriptionResponse>, Error> {
        let requester = self
            .requester_once(&req, "/pil.v1.EventService/RenewSubscription")
            .await?;
        let cert_org = self.organization(&req)?.to_string();
        let req = req.into_inner();
        let id = parse_id(&req.id)?;
        let mut sub = self.owned(id, &requester.token.org_number).await?;
        if sub.ended {
            return Err(Error::precondition(format!(
                "subscription {} was ended; subscribe again",
                req.id
            )));
        }
        sub.expires_at = self.may_follow(&requester, entry, req.days)?;
        sub.requester = subscriber_json(&requester)?;
        // A patient the new token's attest does not cover is followed no more.
        for p in sub.patients.iter_mut().filter(|p| !p.stopped) {
            let Ok(pseudonym) = Pseudonym::try_from(p.pseudonym.as_slice()) else {
                continue;
            };
            let covered = self
                .registry
                .open_sealed(&p.sealed, &pseudonym)
                .ok()
                .and_then(|(system, value)| PatientId::parse(&system, &value, true).ok())
                .is_some_and(|patient| requester.covers(&patient));
            p.stopped = !covered;
        }
        self.record_following(entry, id, &sub).await?;
        self.registry
            .put_subscription(id, sub.clone())
            .await
            .map_err(internal)?;
        entry.detail = Some(format!("subscription {} renewed", req.id));
        // Every region again, with the fresh token.
        let forward = Registration::of(&requester, cert_org, &entry.query_id);
        self.register_everywhere(id, &sub, Some(forward)).await;
        Ok(Response::new(v1::RenewSubscriptionResponse {
            subscription: Some(self.view(id, &sub, self.last_event(id).await?).await?),
        }))
    }

    async fn end_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::EndSubscriptionRequest>,
    ) -> Result<Response<v1::EndSubscriptionResponse>, Error> {
        let requester = self
            .requester_once(&req, "/pil.v1.EventService/EndSubscription")
            .await?;
        entry.requester = Some(RequesterInfo::from(&requester));
        let req = req.into_inner();
        let id = parse_id(&req.id)?;
        let mut sub = self.owned(id, &requester.token.org_number).await?;
        sub.ended = true;
        self.registry
            .put_subscription(id, sub.clone())
            .await
            .map_err(internal)?;
        entry.detail = Some(format!("subscription {} ended", req.id));
        self.register_everywhere(id, &sub, None).await;
        Ok(Response::new(v1::EndSubscriptionResponse {
            subscription: Some(self.view(id, &sub, self.last_event(id).await?).await?),
        }))
    }

    async fn list_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ListSubscriptionsRequest>,
    ) -> Result<Response<v1::ListSubscriptionsResponse>, Error> {
        let requester = self
            .requester_once(&req, "/pil.v1.EventService/ListSubscriptions")
            .await?;
        entry.requester = Some(RequesterInfo::from(&requester));
        let mut subscriptions = Vec::new();
        for (id, sub) in self
            .registry
            .subscriptions_of(&requester.token.org_number)
            .await
            .map_err(internal)?
        {
            if sub.home.is_empty() {
                subscriptions.push(self.view(id, &sub, self.last_event(id).await?).await?);
            }
        }
        entry.detail = Some(format!("{} subscriptions listed", subscriptions.len()));
        Ok(Response::new(v1::ListSubscriptionsResponse {
            subscriptions,
        }))
    }

    /// The events after `after` (at most `limit`) of subscription `id`, as the caller
    /// read it (`sub`), decided for delivery and recorded in the audit log (one record
    /// per patient) before they are returned; with the subscription's newest number.
    /// `everywhere`: to the subscriber, with every region's protections applied (a
    /// peer's node collecting its events applies its own region's only).
    pub(super) async fn deliver(
        &self,
        entry: &AuditRecord,
        id: SubscriptionId,
        mut sub: StoredSubscription,
        after: u64,
        limit: usize,
        everywhere: bool,
    ) -> Result<(Vec<v1::Event>, u64), Error> {
        let page = self
            .registry
            .events(id, after, limit)
            .await
            .map_err(internal)?;
        if after > page.last {
            return Err(Error::out_of_range(format!(
                "after: {after} is beyond the subscription's newest event, {}",
                page.last
            )));
        }
        if after.saturating_add(1) < page.first_kept {
            let days = self.access.legal().settings().subscriptions.events_days;
            return Err(Error::out_of_range(format!(
                "the events after {after} are no longer kept (events are kept {days} days): \
                 look the subscription's patients up to resynchronize, then resume after event \
                 {}",
                page.first_kept - 1
            )));
        }
        if page.events.is_empty() {
            return Ok((Vec::new(), page.last));
        }
        let subscriber: Subscriber =
            serde_json::from_slice(&sub.requester).map_err(Error::internal)?;
        let legal = self.access.legal();
        let search = legal.decide_lookup(&subscriber.facts);
        let blocked = subscriber.blocked();
        // The page's patients, and what protects each of them here and elsewhere.
        let mut patients: BTreeMap<Pseudonym, (String, String)> = BTreeMap::new();
        for (_, event) in &page.events {
            let Some(pseudonym) = event.patient() else {
                continue;
            };
            if patients.contains_key(&pseudonym) {
                continue;
            }
            if let Some(followed) = sub.patients.iter().find(|p| p.is(&pseudonym)) {
                let Ok(current) = Pseudonym::try_from(followed.pseudonym.as_slice()) else {
                    continue;
                };
                let patient = self
                    .registry
                    .open_sealed(&followed.sealed, &current)
                    .map_err(internal)?;
                patients.insert(pseudonym, patient);
            }
        }
        let mut protections = if everywhere {
            let asked: Vec<(Pseudonym, (String, String))> =
                patients.iter().map(|(p, i)| (*p, i.clone())).collect();
            self.protections_elsewhere(id, &blocked, &asked, &entry.query_id)
                .await?
        } else {
            BTreeMap::new()
        };
        for (pseudonym, (system, value)) in &patients {
            let patient = PatientId::parse(system, value, true).map_err(Error::internal)?;
            let (opt_out, blocks) = self
                .registry
                .protections(&patient)
                .await
                .map_err(internal)?;
            let p = protections.entry(*pseudonym).or_default();
            p.opted_out |= opt_out.is_some();
            let here = blocked.shut_out(&blocks);
            p.shut.merge(here.all_holders, here.holders);
        }
        let mut out = Vec::with_capacity(page.events.len());
        // Per patient: the records this delivery makes of them.
        let mut records: BTreeMap<Pseudonym, AuditRecord> = BTreeMap::new();
        let mut stopped = false;
        for (n, event) in page.events {
            let Some(pseudonym) = event.patient() else {
                continue;
            };
            let Some(followed) = sub.patients.iter_mut().find(|p| p.is(&pseudonym)) else {
                continue;
            };
            let patient = patients[&pseudonym].clone();
            let protected = &protections[&pseudonym];
            let record = records.entry(pseudonym).or_insert_with(|| {
                let mut r = entry.clone();
                r.patient = Some(hex::encode(pseudonym));
                r.requester = Some(subscriber.who.clone());
                r.decision.rules = rule_infos(&search.rules);
                r.decision.outcome = "allowed".into();
                r.outcome.status = "OK".into();
                r.detail = Some(format!("subscription {}", hex::encode(id)));
                r
            });
            let collected = !event.region.is_empty();
            self.metrics
                .event_delivered(std::time::Duration::from_nanos(
                    u64::try_from(crate::store::now_nanos().saturating_sub(event.at)).unwrap_or(0),
                ));
            let mut wire = v1::Event {
                number: n,
                id: format!("{}-{n}", hex::encode(id)),
                subscription_id: hex::encode(id),
                kind: event_kind(event.kind) as i32,
                patient: Some(v1::PatientIdentifier {
                    system: patient.0.clone(),
                    value: patient.1.clone(),
                }),
                pointer: None,
                time: Some(to_timestamp(event.at)),
                region: if collected {
                    event.region.clone()
                } else {
                    self.registry.region().to_string()
                },
            };
            let shown: Option<v1::Pointer> = if collected {
                (!event.shown.is_empty())
                    .then(|| v1::Pointer::decode(event.shown.as_slice()))
                    .transpose()
                    .map_err(Error::internal)?
            } else {
                None
            };
            let holder = if collected {
                shown
                    .as_ref()
                    .and_then(|p| p.holder.as_ref())
                    .map(|o| o.organization_number.clone())
            } else {
                event
                    .pointer_key()
                    .map(|k| String::from_utf8_lossy(&k.org).into_owned())
            };
            let unfollowed = followed.stopped
                || protected.opted_out
                || !search.allowed
                || protected.shut.all_holders
                || holder.as_deref().is_some_and(|h| protected.shut.hides(h))
                || event.kind == EventKind::Unfollowed as i32;
            if unfollowed {
                // Said once, not why; the patient is not followed from now on.
                if !followed.stopped {
                    followed.stopped = true;
                    stopped = true;
                }
                wire.kind = v1::EventKind::PatientUnfollowed as i32;
                record.decision.outcome = "denied".into();
                out.push(wire);
                continue;
            }
            let pointer = if collected {
                // Decided by the region that holds it, under its legal configuration.
                shown
            } else {
                self.shown(
                    &legal,
                    &subscriber,
                    &search,
                    &protected.shut,
                    &event,
                    patient,
                )
                .map(|p| super::convert::pointer(&p))
            };
            match pointer {
                Some(pointer) => {
                    record.outcome.pointers += 1;
                    let holder = pointer
                        .holder
                        .as_ref()
                        .map(|o| o.organization_number.clone())
                        .unwrap_or_default();
                    if !record.outcome.organizations.contains(&holder) {
                        record.outcome.organizations.push(holder);
                    }
                    wire.pointer = Some(pointer);
                }
                None => wire.kind = v1::EventKind::NotShown as i32,
            }
            out.push(wire);
        }
        // Recorded before anything leaves, as a lookup's answer is.
        let (first, last_sent) = (
            out.first().map(|e| e.number).unwrap_or(0),
            out.last().map(|e| e.number).unwrap_or(0),
        );
        // All at once, so that they share group commits.
        let appends = records.into_values().map(|mut r| {
            r.detail = Some(format!(
                "subscription {}: events {first} to {last_sent}",
                hex::encode(id)
            ));
            self.audit.append(r)
        });
        futures::future::try_join_all(appends)
            .await
            .map_err(unrecorded)?;
        if stopped {
            self.registry
                .put_subscription(id, sub)
                .await
                .map_err(internal)?;
        }
        Ok((out, page.last))
    }

    /// The event's pointer as a lookup by the subscriber would show it, if it would.
    fn shown(
        &self,
        legal: &pil_legal::LegalConfig,
        subscriber: &Subscriber,
        search: &pil_legal::Decision,
        shut: &crate::access::ShutOut,
        event: &StoredEvent,
        patient: (String, String),
    ) -> Option<crate::registry::Pointer> {
        let key = event.pointer_key()?;
        let value = event.pointer.clone()?;
        let pointer = self.registry.pointer_of(key, value, patient);
        lookup::decide_each(legal, &subscriber.facts, search, vec![pointer], shut)
            .pointers
            .pop()
    }

    async fn pull_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::PullEventsRequest>,
    ) -> Result<Response<v1::PullEventsResponse>, Error> {
        let requester = self
            .requester_once(&req, "/pil.v1.EventService/PullEvents")
            .await?;
        entry.requester = Some(RequesterInfo::from(&requester));
        let req = req.into_inner();
        let id = parse_id(&req.subscription_id)?;
        let sub = self.owned(id, &requester.token.org_number).await?;
        let limit = match req.max_events as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let (events, last_event) = self.deliver(entry, id, sub, req.after, limit, true).await?;
        entry.detail = Some(format!(
            "subscription {}: {} events after {}",
            req.subscription_id,
            events.len(),
            req.after
        ));
        Ok(Response::new(v1::PullEventsResponse { events, last_event }))
    }

    async fn stream_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::StreamEventsRequest>,
    ) -> Result<Response<EventStream>, Error> {
        let requester = self
            .requester_once(&req, "/pil.v1.EventService/StreamEvents")
            .await?;
        entry.requester = Some(RequesterInfo::from(&requester));
        let req = req.into_inner();
        let id = parse_id(&req.subscription_id)?;
        let owner = requester.token.org_number.clone();
        let sub = self.owned(id, &owner).await?;
        // Checked now, so that a position that is gone is refused as the call's answer.
        self.deliver(entry, id, sub, req.after, 0, true).await?;
        let heartbeat = Duration::from_secs(u64::from(match req.heartbeat_seconds {
            0 => DEFAULT_HEARTBEAT_SECS,
            n => n.clamp(1, 3600),
        }));
        entry.detail = Some(format!(
            "subscription {}: stream after {}",
            req.subscription_id, req.after
        ));
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let service = self.clone();
        let record = entry.clone();
        tokio::spawn(async move {
            let mut after = req.after;
            let mut quiet_since = tokio::time::Instant::now();
            let writes = service.registry.writes();
            loop {
                // Enabled before reading, so a write while the events are read and sent
                // is not missed.
                let written = writes.notified();
                tokio::pin!(written);
                written.as_mut().enable();
                let delivered = match service.owned(id, &owner).await {
                    Ok(sub) => {
                        service
                            .deliver(&record, id, sub, after, DEFAULT_PAGE, true)
                            .await
                    }
                    Err(e) => Err(e),
                };
                let (events, last) = match delivered {
                    Ok(d) => d,
                    // A region whose protections could not be checked holds the
                    // events back; the stream waits for it, with heartbeats.
                    Err(Error::Unavailable(why)) => {
                        tracing::debug!(subscription = %hex::encode(id), %why, "events wait");
                        (Vec::new(), after)
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let got = !events.is_empty();
                for event in events {
                    after = event.number;
                    let message = v1::StreamEventsResponse {
                        message: Some(v1::stream_events_response::Message::Event(event)),
                    };
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
                if got {
                    quiet_since = tokio::time::Instant::now();
                    continue;
                }
                if quiet_since.elapsed() >= heartbeat {
                    let beat = v1::StreamEventsResponse {
                        message: Some(v1::stream_events_response::Message::Heartbeat(
                            v1::Heartbeat {
                                time: Some(to_timestamp(now_nanos())),
                                last_event: last,
                            },
                        )),
                    };
                    if tx.send(Ok(beat)).await.is_err() {
                        return;
                    }
                    quiet_since = tokio::time::Instant::now();
                }
                tokio::select! {
                    _ = &mut written => {}
                    _ = tokio::time::sleep(STREAM_POLL) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        let stream: EventStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
        Ok(Response::new(stream))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::StreamEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl v1::event_service_server::EventService for NodeService {
    type StreamEventsStream = EventStream;

    async fn subscribe(
        &self,
        req: Request<v1::SubscribeRequest>,
    ) -> Result<Response<v1::SubscribeResponse>, Status> {
        self.serve(req, Action::Subscribe, |s, e, r| {
            Box::pin(s.subscribe_inner(e, r))
        })
        .await
    }

    async fn list_subscriptions(
        &self,
        req: Request<v1::ListSubscriptionsRequest>,
    ) -> Result<Response<v1::ListSubscriptionsResponse>, Status> {
        self.serve(req, Action::SubscriptionManage, |s, e, r| {
            Box::pin(s.list_inner(e, r))
        })
        .await
    }

    async fn renew_subscription(
        &self,
        req: Request<v1::RenewSubscriptionRequest>,
    ) -> Result<Response<v1::RenewSubscriptionResponse>, Status> {
        self.serve(req, Action::Subscribe, |s, e, r| {
            Box::pin(s.renew_inner(e, r))
        })
        .await
    }

    async fn end_subscription(
        &self,
        req: Request<v1::EndSubscriptionRequest>,
    ) -> Result<Response<v1::EndSubscriptionResponse>, Status> {
        self.serve(req, Action::SubscriptionManage, |s, e, r| {
            Box::pin(s.end_inner(e, r))
        })
        .await
    }

    async fn pull_events(
        &self,
        req: Request<v1::PullEventsRequest>,
    ) -> Result<Response<v1::PullEventsResponse>, Status> {
        self.serve(req, Action::EventDelivery, |s, e, r| {
            Box::pin(s.pull_inner(e, r))
        })
        .await
    }

    async fn stream_events(
        &self,
        req: Request<v1::StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        self.serve(req, Action::EventDelivery, |s, e, r| {
            Box::pin(s.stream_inner(e, r))
        })
        .await
    }
}
