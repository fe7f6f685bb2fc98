//! `AuditService`: auditors' read access to the audit log, itself audited. Needs the
//! auditor role in the legal configuration.

use std::pin::Pin;

use futures::Stream;
use pil_legal::Role;
use pil_proto::{ident::PatientId, v1};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{NodeService, invalid};
use crate::{
    audit::{
        AuditRecord,
        fhir::{self, NodeInfo},
        query::{self, Filter, parse_record},
        record::Action,
    },
    error::Error,
    pointer,
    store::StoreError,
};

/// Longest review note, and reviewer name, in characters.
const MAX_NOTE: usize = 2000;
const MAX_REVIEWER: usize = 200;
/// Records a search returns by default, and at most.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Records read per storage call while exporting.
const SCAN_CHUNK: usize = 1000;
/// Signed heads per ListTreeHeads page.
const MAX_HEADS_PAGE: usize = 10_000;
/// Lines per message of an export or log stream.
const STREAM_PAGE: usize = 500;

type ExportStream = Pin<Box<dyn Stream<Item = Result<v1::ExportAuditResponse, Status>> + Send>>;
type ReadLogStream = Pin<Box<dyn Stream<Item = Result<v1::ReadLogResponse, Status>> + Send>>;

/// RFC 3339 UTC with milliseconds, comparable as text with recorded times.
fn timestamp_text(t: &prost_types::Timestamp) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(t.seconds)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        + time::Duration::nanoseconds(i64::from(t.nanos));
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.format(&format).unwrap_or_default()
}

impl NodeService {
    fn filter_of(
        &self,
        f: Option<v1::AuditFilter>,
        entry: &mut AuditRecord,
    ) -> Result<Filter, Error> {
        let f = f.unwrap_or_default();
        let patients = match f.patient.as_ref() {
            Some(p) => {
                let id = pointer::patient(Some(p), self.config.test_data).map_err(invalid)?;
                entry.patient = Some(hex::encode(self.registry.pseudonym(&id)));
                self.audit_pseudonyms(&id)
            }
            None => Vec::new(),
        };
        let some = |s: String| {
            let s = s.trim().to_string();
            (!s.is_empty()).then_some(s)
        };
        let decision = some(f.decision);
        if let Some(d) = &decision
            && !["allowed", "denied", "unauthenticated", "not_applicable"].contains(&d.as_str())
        {
            return Err(Error::invalid(
                "filter.decision: must be allowed, denied, unauthenticated or not_applicable",
            ));
        }
        // A filter value the log can never hold is a mistake to tell, not an empty page.
        let hpr = some(f.hpr_number);
        if let Some(h) = &hpr {
            pil_proto::ident::HprNumber::parse(h)
                .map_err(|e| Error::invalid(format!("filter.hpr_number: {e}")))?;
        }
        let organization = some(f.organization_number);
        if let Some(o) = &organization {
            pointer::org_number("filter.organization_number", o).map_err(invalid)?;
        }
        let filter = Filter {
            patients,
            hpr,
            organization,
            purpose: some(f.purpose_of_use),
            decision,
            from: f.from.as_ref().map(timestamp_text),
            to: f.to.as_ref().map(timestamp_text),
            actions: f.actions.iter().map(|a| a.trim().to_string()).collect(),
            emergency_only: f.emergency_only,
            lookups_only: false,
        };
        entry.detail = Some(format!(
            "filter: hpr={:?} organization={:?} purpose={:?} decision={:?} from={:?} to={:?} actions={:?} emergency_only={}",
            filter.hpr,
            filter.organization,
            filter.purpose,
            filter.decision,
            filter.from,
            filter.to,
            filter.actions,
            filter.emergency_only
        ));
        Ok(filter)
    }

    fn node_info(&self) -> NodeInfo {
        NodeInfo {
            region: self.registry.region().to_string(),
            node_url: self
                .config
                .auth
                .public_url
                .clone()
                .unwrap_or_else(|| format!("https://{}", self.config.listen)),
        }
    }

    async fn search_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::SearchAuditRequest>,
    ) -> Result<Response<v1::SearchAuditResponse>, Error> {
        self.require_role(&req, Role::Auditor)?;
        let req = req.into_inner();
        let filter = self.filter_of(req.filter, entry)?;
        let limit = match req.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let before = match req.page_token.trim() {
            "" => u64::MAX,
            t => t
                .parse()
                .map_err(|_| Error::invalid("page_token: not from a previous page"))?,
        };
        let (records, next) = query::search(&**self.audit.store(), &filter, before, limit)
            .await
            .map_err(Error::internal)?;
        entry.outcome.pointers = 0;
        Ok(Response::new(v1::SearchAuditResponse {
            records,
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn export_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ExportAuditRequest>,
    ) -> Result<Response<ExportStream>, Error> {
        self.require_role(&req, Role::Auditor)?;
        let req = req.into_inner();
        let fhir_format = match v1::AuditExportFormat::try_from(req.format) {
            Ok(v1::AuditExportFormat::JsonLines) => false,
            Ok(v1::AuditExportFormat::FhirAuditEvent) => true,
            _ => {
                return Err(Error::invalid(
                    "format: must be AUDIT_EXPORT_FORMAT_JSON_LINES or \
                     AUDIT_EXPORT_FORMAT_FHIR_AUDIT_EVENT",
                ));
            }
        };
        let filter = self.filter_of(req.filter, entry)?;
        let store = self.audit.store().clone();
        let node = self.node_info();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut from = 0u64;
            loop {
                let page = match store.audit_records(from, true, SCAN_CHUNK).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(Error::internal(e).into())).await;
                        return;
                    }
                };
                let Some(last) = page.last().map(|(i, _)| *i) else {
                    return;
                };
                from = last + 1;
                let mut lines = Vec::new();
                for (_, bytes) in page {
                    let Some(record) = parse_record(&bytes) else {
                        continue;
                    };
                    if !filter.matches(&record) {
                        continue;
                    }
                    lines.push(if fhir_format {
                        serde_json::to_vec(&fhir::audit_event(&record, &node)).unwrap_or_default()
                    } else {
                        bytes
                    });
                    if lines.len() >= STREAM_PAGE {
                        let msg = v1::ExportAuditResponse {
                            lines: std::mem::take(&mut lines),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                }
                if !lines.is_empty()
                    && tx
                        .send(Ok(v1::ExportAuditResponse { lines }))
                        .await
                        .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn read_log_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ReadLogRequest>,
    ) -> Result<Response<ReadLogStream>, Error> {
        self.require_role(&req, Role::Auditor)?;
        let from = req.get_ref().from_index;
        entry.detail = Some(format!("read log from {from}"));
        let store = self.audit.store().clone();
        let size = self.audit.size().await.map_err(Error::internal)?.size;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut next = from;
            while next < size {
                let end = (next + STREAM_PAGE as u64).min(size);
                match store.audit_entries(next, end).await {
                    Ok(entries) => {
                        next = end;
                        let entries = entries
                            .into_iter()
                            .map(|e| v1::LogEntry {
                                index: e.index,
                                record: e.record.unwrap_or_default(),
                                leaf_hash: e.leaf_hash.to_vec(),
                            })
                            .collect();
                        if tx.send(Ok(v1::ReadLogResponse { entries })).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Error::internal(e).into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_tree_heads_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ListTreeHeadsRequest>,
    ) -> Result<Response<v1::ListTreeHeadsResponse>, Error> {
        self.require_role(&req, Role::Auditor)?;
        entry.detail = Some("list tree heads".into());
        let v1::ListTreeHeadsRequest {
            after_size,
            page_size,
        } = req.into_inner();
        let limit = match page_size as usize {
            0 => MAX_HEADS_PAGE,
            n => n.min(MAX_HEADS_PAGE),
        };
        let mut heads = self
            .audit
            .store()
            .audit_heads_after(after_size, limit + 1)
            .await
            .map_err(Error::internal)?;
        let more = heads.len() > limit;
        heads.truncate(limit);
        Ok(Response::new(v1::ListTreeHeadsResponse {
            heads: heads
                .into_iter()
                .map(|(size, note)| v1::SignedTreeHead { note, size })
                .collect(),
            more,
        }))
    }

    async fn get_tree_head_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::GetTreeHeadRequest>,
    ) -> Result<Response<v1::GetTreeHeadResponse>, Error> {
        self.require_role(&req, Role::Auditor)?;
        entry.detail = Some("get tree head".into());
        let head = if req.get_ref().sign_now {
            self.audit.sign_head().await.map_err(Error::internal)?
        } else {
            self.audit
                .store()
                .audit_latest_head()
                .await
                .map_err(Error::internal)?
        };
        let head =
            head.ok_or_else(|| Error::precondition("the audit log has no signed tree head yet"))?;
        Ok(Response::new(v1::GetTreeHeadResponse {
            head: Some(v1::SignedTreeHead {
                note: head.1,
                size: head.0,
            }),
        }))
    }

    async fn get_inclusion_proof_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::GetInclusionProofRequest>,
    ) -> Result<Response<v1::GetInclusionProofResponse>, Error> {
        self.require_role(&req, Role::Auditor)?;
        let v1::GetInclusionProofRequest { index, tree_size } = req.into_inner();
        entry.detail = Some(format!("inclusion proof of {index} in {tree_size}"));
        let size = self.audit.size().await.map_err(Error::internal)?.size;
        if tree_size == 0 || tree_size > size || index >= tree_size {
            return Err(Error::out_of_range(format!(
                "need index < tree_size <= {size} (the log's size); got index {index}, tree_size {tree_size}"
            )));
        }
        let store = self.audit.store();
        let proof = store
            .audit_inclusion_proof(index, tree_size)
            .await
            .map_err(Error::internal)?;
        let entry_read = store
            .audit_entries(index, index + 1)
            .await
            .map_err(Error::internal)?
            .pop()
            .ok_or_else(|| Error::internal(StoreError::Tree(format!("no record {index}"))))?;
        let (record, leaf) = (entry_read.record.unwrap_or_default(), entry_read.leaf_hash);
        Ok(Response::new(v1::GetInclusionProofResponse {
            record,
            leaf_hash: leaf.to_vec(),
            proof: proof.into_iter().map(|h| h.to_vec()).collect(),
        }))
    }

    async fn get_consistency_proof_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::GetConsistencyProofRequest>,
    ) -> Result<Response<v1::GetConsistencyProofResponse>, Error> {
        self.require_role(&req, Role::Auditor)?;
        let v1::GetConsistencyProofRequest { old_size, new_size } = req.into_inner();
        entry.detail = Some(format!("consistency proof {old_size} to {new_size}"));
        let size = self.audit.size().await.map_err(Error::internal)?.size;
        if old_size == 0 || old_size > new_size || new_size > size {
            return Err(Error::out_of_range(format!(
                "need 1 <= old_size <= new_size <= {size} (the log's size); got {old_size}, {new_size}"
            )));
        }
        let proof = self
            .audit
            .store()
            .audit_consistency_proof(old_size, new_size)
            .await
            .map_err(Error::internal)?;
        Ok(Response::new(v1::GetConsistencyProofResponse {
            proof: proof.into_iter().map(|h| h.to_vec()).collect(),
        }))
    }

    /// This node's records of lookups of a patient, oldest first.
    /// The patient's pseudonyms (hex) under every key of the ring, for audit search.
    pub(super) fn audit_pseudonyms(&self, patient: &PatientId) -> Vec<String> {
        self.registry
            .audit_pseudonyms(patient)
            .iter()
            .map(hex::encode)
            .collect()
    }

    pub(super) async fn patient_lookups(&self, patient: &PatientId) -> Result<Vec<Vec<u8>>, Error> {
        let filter = Filter {
            patients: self.audit_pseudonyms(patient),
            lookups_only: true,
            ..Filter::default()
        };
        let mut records = Vec::new();
        let mut before = u64::MAX;
        loop {
            let (page, next) = query::search(&**self.audit.store(), &filter, before, MAX_PAGE)
                .await
                .map_err(Error::internal)?;
            records.extend(page);
            match next {
                Some(n) => before = n,
                None => break,
            }
        }
        records.reverse();
        Ok(records)
    }

    async fn patient_report_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::PatientReportRequest>,
    ) -> Result<Response<v1::PatientReportResponse>, Error> {
        self.require_role(&req, Role::Auditor)?;
        let req = req.into_inner();
        let patient =
            pointer::patient(req.patient.as_ref(), self.config.test_data).map_err(invalid)?;
        entry.patient = Some(hex::encode(self.registry.pseudonym(&patient)));
        entry.detail = Some("patient report".into());
        let records = self.patient_lookups(&patient).await?;
        let mut regions = vec![v1::RegionReport {
            region: self.registry.region().to_string(),
            answered: true,
            detail: String::new(),
            records,
        }];
        if !req.home_region_only {
            let auditor = entry.caller.organization.clone().unwrap_or_default();
            let deadline =
                std::time::Duration::from_millis(self.federation.config().deadline_ms.max(1) * 5);
            for (region, result) in self
                .federation
                .patient_reports(
                    v1::ForwardedPatientReportRequest {
                        patient: req.patient.clone(),
                        auditor_organization_number: auditor,
                    },
                    deadline,
                )
                .await
            {
                entry.peers_asked.push(region.clone());
                regions.push(match result {
                    Ok(records) => v1::RegionReport {
                        region,
                        answered: true,
                        detail: String::new(),
                        records,
                    },
                    Err(detail) => v1::RegionReport {
                        region,
                        answered: false,
                        detail,
                        records: Vec::new(),
                    },
                });
            }
        }
        Ok(Response::new(v1::PatientReportResponse { regions }))
    }
}

impl NodeService {
    async fn review_record_inner(
        &self,
        entry: &mut AuditRecord,
        req: Request<v1::ReviewRecordRequest>,
    ) -> Result<Response<v1::ReviewRecordResponse>, Error> {
        self.require_role(&req, Role::Auditor)?;
        let v1::ReviewRecordRequest {
            index,
            note,
            reviewer,
        } = req.into_inner();
        let (note, reviewer) = (note.trim(), reviewer.trim());
        if note.is_empty() || note.chars().count() > MAX_NOTE {
            return Err(Error::invalid(format!(
                "note: say what the review found and did, in 1 to {MAX_NOTE} characters \
                 (got {})",
                note.chars().count()
            )));
        }
        if reviewer.chars().count() > MAX_REVIEWER {
            return Err(Error::invalid(format!(
                "reviewer: at most {MAX_REVIEWER} characters"
            )));
        }
        let size = self.audit.size().await.map_err(Error::internal)?.size;
        if index >= size {
            return Err(Error::out_of_range(format!(
                "index: this node's log holds records 0 to {} ; there is no record {index}",
                size.saturating_sub(1)
            )));
        }
        let bytes = self
            .audit
            .store()
            .audit_record(index)
            .await
            .map_err(Error::internal)?
            .ok_or_else(|| {
                Error::precondition(format!(
                    "record {index}'s contents were removed after the retention period; \
                     there is nothing left to review"
                ))
            })?;
        let reviewed = parse_record(&bytes).ok_or_else(|| {
            Error::internal(StoreError::Tree(format!("record {index} does not parse")))
        })?;
        // Found with the patient's records, so the patient's report can show it.
        entry.patient = reviewed.patient;
        entry.reviewed = Some(index);
        entry.detail = Some(if reviewer.is_empty() {
            note.to_string()
        } else {
            format!("{reviewer}: {note}")
        });
        Ok(Response::new(v1::ReviewRecordResponse {}))
    }
}

#[tonic::async_trait]
impl v1::audit_service_server::AuditService for NodeService {
    async fn review_record(
        &self,
        req: Request<v1::ReviewRecordRequest>,
    ) -> Result<Response<v1::ReviewRecordResponse>, Status> {
        self.serve(req, Action::AuditReview, |s, e, r| {
            Box::pin(s.review_record_inner(e, r))
        })
        .await
    }

    async fn search_audit(
        &self,
        req: Request<v1::SearchAuditRequest>,
    ) -> Result<Response<v1::SearchAuditResponse>, Status> {
        self.serve(req, Action::AuditAccess, |s, e, r| {
            Box::pin(s.search_inner(e, r))
        })
        .await
    }

    type ExportAuditStream = ExportStream;

    async fn export_audit(
        &self,
        req: Request<v1::ExportAuditRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        self.serve(req, Action::AuditAccess, |s, e, r| {
            Box::pin(s.export_inner(e, r))
        })
        .await
    }

    type ReadLogStream = ReadLogStream;

    async fn read_log(
        &self,
        req: Request<v1::ReadLogRequest>,
    ) -> Result<Response<ReadLogStream>, Status> {
        self.serve(req, Action::AuditAccess, |s, e, r| {
            Box::pin(s.read_log_inner(e, r))
        })
        .await
    }

    async fn list_tree_heads(
        &self,
        req: Request<v1::ListTreeHeadsRequest>,
    ) -> Result<Response<v1::ListTreeHeadsResponse>, Status> {
        self.serve(req, Action::AuditAccess, |s, e, r| {
            Box::pin(s.list_tree_heads_inner(e, r))
        })
        .await
    }

    async fn get_tree_head(
        &self,
        req: Request<v1::GetTreeHeadRequest>,
    ) -> Result<Response<v1::GetTreeHeadResponse>, Status> {
        self.serve(req, Action::AuditAccess, |s, e, r| {
            Box::pin(s.get_tree_head_inner(e, r))
        })
        .await
    }

    async fn get_inclusion_proof(
        &self,
        req: Request<v1::GetInclusionProofRequest>,
    ) -> Result<Response<v1::GetInclusionProofResponse>, Status> {
        self.serve(req, Action::AuditAccess, |s, e, r| {
            Box::pin(s.get_inclusion_proof_inner(e, r))
        })
        .await
    }

    async fn get_consistency_proof(
        &self,
        req: Request<v1::GetConsistencyProofRequest>,
    ) -> Result<Response<v1::GetConsistencyProofResponse>, Status> {
        self.serve(req, Action::AuditAccess, |s, e, r| {
            Box::pin(s.get_consistency_proof_inner(e, r))
        })
        .await
    }

    async fn patient_report(
        &self,
        req: Request<v1::PatientReportRequest>,
    ) -> Result<Response<v1::PatientReportResponse>, Status> {
        self.serve(req, Action::AuditAccess, |s, e, r| {
            Box::pin(s.patient_report_inner(e, r))
        })
        .await
    }
}
