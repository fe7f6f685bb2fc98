//! `LookupService.Lookup`, and the local answer that federated lookups share.

use std::time::Duration;

use pil_proto::{ident::PatientId, v1};
use tonic::{Request, Response, Status};

use super::{
    NodeService,
    convert::{self, applied_rules},
    denied, internal, invalid,
};
use crate::{
    access::{Requester, ShutOut},
    audit::{
        AuditRecord,
        record::{Action, RequesterInfo},
        rule_infos,
    },
    error::Error,
    federation::PeerOutcome,
    lookup::{self, Shown},
    patient_keys::Pseudonym,
    pointer,
    registry::{LookupFilter, PatientView},
};

/// What this node's own pointers give a requester.
pub struct LocalAnswer {
    pub pointers: Vec<v1::Pointer>,
    pub rules: Vec<pil_legal::RuleRef>,
    pub emergency: bool,
    pub opted_out: bool,
    /// What this region's blocks shut the requester out of, in every region.
    pub shut: ShutOut,
}

impl NodeService {
    /// Decides and answers a lookup from this node's own pointers, and fills the audit
    /// record with who asked, what was decided and what was returned.
    pub(super) async fn answer_locally(
        &self,
        requester: &Requester,
        patient: &PatientId,
        pseudonym: Pseudonym,
        filter: LookupFilter,
        entry: &mut AuditRecord,
    ) -> Result<LocalAnswer, Error> {
        entry.requester = Some(RequesterInfo::from(requester));
        if let Err(e) = covered(requester, patient) {
            entry.decision.outcome = "denied".into();
            return Err(e);
        }
        let legal = self.access.legal();
        let search = legal.decide_lookup(&requester.facts);
        entry.decision.rules = rule_infos(&search.rules);
        entry.decision.emergency = search.emergency;
        if !search.allowed {
            entry.decision.outcome = "denied".into();
            return Err(denied(&search));
        }
        entry.decision.outcome = "allowed".into();
        let (blocks, found) = match self
            .registry
            .patient_view_of(pseudonym, patient, &filter)
            .await
            .map_err(internal)?
        {
            PatientView::OptedOut => {
                entry.outcome.detail = "the patient has opted out of PIL".into();
                return Ok(LocalAnswer {
                    pointers: Vec::new(),
                    rules: search.rules,
                    emergency: false,
                    opted_out: true,
                    shut: ShutOut::default(),
                });
            }
            PatientView::Visible { blocks, pointers } => (blocks, pointers),
        };
        let shut = requester.shut_out(&blocks);
        let lookup::Visible {
            pointers,
            rules,
            emergency,
        } = lookup::decide_each(&legal, &requester.facts, &search, found, &shut);
        let pointers: Vec<v1::Pointer> = pointers.iter().map(convert::pointer).collect();
        entry.decision.rules = rule_infos(&rules);
        entry.decision.emergency = emergency;
        record_returned(entry, &pointers);
        Ok(LocalAnswer {
            pointers,
            rules,
            emergency,
            opted_out: false,
            shut,
        })
    }

    async fn lookup_inner(
        &self,
        req: Request<v1::LookupRequest>,
        entry: &mut AuditRecord,
    ) -> Result<Response<v1::LookupResponse>, Error> {
        let patient = pointer::patient(req.get_ref().patient.as_ref(), self.config.test_data)
            .map_err(invalid)?;
        let pseudonym = self.registry.pseudonym(&patient);
        entry.patient = Some(hex::encode(pseudonym));
        let requester = self
            .requester_once(&req, "/pil.v1.LookupService/Lookup")
            .await?;
        let caller = requester.token.org_number.clone();
        let deadline = self.federation_deadline(&req);
        let cert_org = self.organization(&req)?.to_string();
        let req = req.into_inner();
        let filter = lookup_filter(&req)?;
        let local = match self
            .answer_locally(&requester, &patient, pseudonym, filter, entry)
            .await
        {
            Ok(a) => a,
            Err(status) => {
                tracing::info!(caller = %caller, query_id = %entry.query_id, status = %status, "lookup refused");
                return Err(status);
            }
        };
        let region = self.registry.region().to_string();
        let mut regions = vec![v1::RegionStatus {
            region,
            state: v1::RegionState::Ok as i32,
            detail: if local.opted_out {
                "the patient has opted out of PIL".into()
            } else {
                String::new()
            },
            // Counted below, once every region's protections are applied.
            pointer_count: 0,
        }];
        let mut pointers = local.pointers;
        let mut rules = applied_rules(&local.rules);
        let mut emergency = local.emergency;
        let mut opted_out = local.opted_out;
        let forward = v1::ForwardedLookupRequest {
            lookup: Some(req.clone()),
            access_token: requester.presented.clone(),
            query_id: entry.query_id.clone(),
            client_organization_number: cert_org,
            protections_only: false,
        };
        // An opt-out here already means nothing is shown; otherwise every region is
        // asked, at least for the protections that hold for every region's pointers.
        let ask = !local.opted_out;
        // Regions whose current summary cannot hold the patient are not asked: they
        // hold neither pointers nor protections for them.
        let routes = if ask {
            self.routing
                .router
                .route(&patient, pseudonym, req.all_regions)
                .await
        } else {
            Default::default()
        };
        let outcomes = self
            .federation
            .fan_out(
                forward,
                &requester.facts.purpose,
                deadline,
                ask,
                !req.home_region_only,
                &routes.skip,
            )
            .await;
        let mut shut = local.shut;
        let mut unchecked = Vec::new();
        for (peer, outcome, took) in outcomes {
            self.metrics.forwarded(&peer, outcome.name(), took);
            let asked = !matches!(
                outcome,
                PeerOutcome::NotAsked(_) | PeerOutcome::HoldsNothing(_)
            );
            // A region that did not answer may hold protections for this patient.
            let checked = matches!(
                outcome,
                PeerOutcome::Answered(_)
                    | PeerOutcome::Protections(..)
                    | PeerOutcome::NotAsked(_)
                    | PeerOutcome::HoldsNothing(_)
            );
            let (state, mut detail) = match outcome {
                PeerOutcome::Answered(answer) => {
                    opted_out |= answer.opted_out;
                    shut.merge(answer.blocked_all_holders, answer.blocked_holders);
                    for r in answer.rules {
                        if !rules.iter().any(|k| k.id == r.id) {
                            rules.push(r);
                        }
                    }
                    if !answer.refused.is_empty() {
                        (v1::RegionState::Denied, answer.refused)
                    } else {
                        emergency |= answer.emergency;
                        pointers.extend(answer.pointers);
                        let detail = if answer.opted_out {
                            "the patient has opted out of PIL".to_string()
                        } else {
                            String::new()
                        };
                        (v1::RegionState::Ok, detail)
                    }
                }
                PeerOutcome::Protections(answer, why) => {
                    opted_out |= answer.opted_out;
                    shut.merge(answer.blocked_all_holders, answer.blocked_holders);
                    (v1::RegionState::NotAsked, why)
                }
                PeerOutcome::Denied(why) => (v1::RegionState::Denied, why),
                PeerOutcome::TimedOut => (
                    v1::RegionState::TimedOut,
                    format!("no answer within {} ms", deadline.as_millis()),
                ),
                PeerOutcome::Unavailable(why) => (v1::RegionState::Unavailable, why),
                PeerOutcome::NotAsked(why) => (v1::RegionState::NotAsked, why),
                PeerOutcome::HoldsNothing(why) => (v1::RegionState::HoldsNothing, why),
            };
            if asked {
                entry.peers_asked.push(peer.clone());
            }
            if !checked {
                unchecked.push(peer.clone());
                detail.push_str(
                    "; the patient's blocks and opt-out registered there could not be checked",
                );
            }
            regions.push(v1::RegionStatus {
                region: peer,
                state: state as i32,
                detail,
                // Counted below, once every region's protections are applied.
                pointer_count: 0,
            });
        }
        // Opted out anywhere means out of PIL altogether; a block anywhere hides its
        // holders' pointers from every region.
        lookup::protect(&mut pointers, opted_out, &shut);
        let mut withheld = String::new();
        if !unchecked.is_empty() && !pointers.is_empty() {
            let legal = self.access.legal();
            let settings = &legal.settings().protections;
            let shown_anyway = emergency && settings.emergency_shows_unchecked;
            if shown_anyway {
                let rule = pil_legal::RuleRef {
                    id: "emergency-shows-unchecked-protections".into(),
                    legal_basis: settings.emergency_legal_basis.clone(),
                    explanation: format!(
                        "Emergency access: pointers are shown although the protections \
                         registered in {} could not be checked.",
                        unchecked.join(", ")
                    ),
                    effect: pil_legal::RuleEffect::Permit,
                };
                entry.decision.rules.extend(rule_infos([&rule]));
                rules.extend(applied_rules([&rule]));
            } else {
                withheld = format!(
                    "no pointers are shown: the patient's blocks and opt-out registered in {} \
                     could not be checked, and they hold for every region's pointers; retry \
                     when the region answers",
                    unchecked.join(", ")
                );
                entry.outcome.detail = withheld.clone();
                pointers.clear();
            }
        }
        // Counted after every region's protections, so a count does not hint at
        // what a block hides.
        for status in &mut regions {
            status.pointer_count = pointers
                .iter()
                .filter(|p| p.region == status.region)
                .count() as u32;
        }
        let pointers = lookup::merge(pointers);
        record_returned(entry, &pointers);
        entry.decision.emergency = emergency;
        tracing::info!(
            caller = %caller, query_id = %entry.query_id, found = pointers.len(),
            emergency, opted_out, purpose = %requester.facts.purpose, "lookup"
        );
        let answer = v1::LookupResponse {
            regions,
            pointers,
            query_id: entry.query_id.clone(),
            opted_out,
            rules,
            emergency,
            withheld,
        };
        // Refused here, not by the encoder after the answer was recorded as given.
        let max = self.config.limits.max_message_bytes;
        if prost::Message::encoded_len(&answer) > max {
            return Err(Error::overloaded(format!(
                "the answer holds {} pointers, more than fit in one message of {max} bytes; \
                 narrow the lookup by category or organization",
                answer.pointers.len()
            )));
        }
        Ok(Response::new(answer))
    }

    /// How long peers get: the configured cap, or less when the client's own gRPC
    /// deadline is shorter (a little is kept back for merging and answering).
    fn federation_deadline<T>(&self, req: &Request<T>) -> Duration {
        let cap = Duration::from_millis(self.federation.config().deadline_ms.max(1));
        let client = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|d| d.saturating_sub(Duration::from_millis(20)));
        match client {
            Some(d) => d.min(cap),
            None => cap,
        }
    }
}

/// Refuses a lookup of a patient the token's attest does not cover.
pub(super) fn covered(requester: &Requester, patient: &PatientId) -> Result<(), Error> {
    if requester.covers(patient) {
        Ok(())
    } else {
        Err(Error::denied(
            "the access token's attest names other patients than the one looked up",
        ))
    }
}

/// The lookup's category and organization filters, validated. Client lookups and
/// forwarded ones take the same request, so they share this.
pub(super) fn lookup_filter(req: &v1::LookupRequest) -> Result<LookupFilter, Error> {
    let categories =
        pointer::category_list("categories", &req.categories, false).map_err(invalid)?;
    let organizations = req
        .organization_numbers
        .iter()
        .map(|o| pointer::org_number("organization_numbers", o).map(|o| o.to_string()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    Ok(LookupFilter {
        categories,
        organizations,
    })
}

/// A `grpc-timeout` header value: up to 8 digits and a unit.
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Records in the audit entry what an answer returns: how many pointers, from which
/// holder organizations.
fn record_returned(entry: &mut AuditRecord, pointers: &[impl Shown]) {
    entry.outcome.pointers = pointers.len() as u32;
    entry.outcome.organizations = lookup::holders(pointers);
}

#[tonic::async_trait]
impl v1::lookup_service_server::LookupService for NodeService {
    async fn lookup(
        &self,
        req: Request<v1::LookupRequest>,
    ) -> Result<Response<v1::LookupResponse>, Status> {
        self.serve(req, Action::Lookup, |s, e, r| {
            Box::pin(s.lookup_inner(r, e))
        })
        .await
    }
}
