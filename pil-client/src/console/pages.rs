//! The console's views. Each handler asks the nodes, checks what must be proven, and
//! renders a template from `templates/console/`; the templates escape everything.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use askama::Template;
use axum::{
    Form, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    middleware,
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use pil_proto::v1;
use serde::Deserialize;

use super::{
    Console,
    chart::{self, Series},
    flags::{self, Flag, Thresholds},
    guard,
    region::{Consistency, HeadView, LogState, Proof, Region},
    words::{self, Lang, Words},
};
use crate::{audit_record::Record, error::ClientError, records};

const CSS: &str = include_str!("../../assets/console.css");
/// Records per search page.
const PAGE: u32 = 50;
/// Report rows proven one by one; a longer report says the rest were not checked.
const MAX_PROVEN: usize = 500;

pub(super) fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/search", get(search))
        .route("/record", get(record))
        .route("/review", post(review))
        .route("/log", get(log_state))
        .route("/report", get(report))
        .route("/follow-up", get(follow_up))
        .route("/console.css", get(css))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            console.clone(),
            guard::check,
        ))
        .with_state(console)
}

/// What the frame of every page needs.
struct Base {
    nav: &'static str,
    regions: Vec<String>,
    region: String,
}

impl Base {
    fn new(console: &Console, nav: &'static str, region: &Region) -> Self {
        Self {
            nav,
            regions: console.region_names(),
            region: region.name.clone(),
        }
    }
}

/// A page that could not be made, said once, with the status that fits.
struct PageError {
    status: StatusCode,
    message: String,
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage {
    base: Base,
    message: String,
}

impl PageError {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl From<ClientError> for PageError {
    fn from(e: ClientError) -> Self {
        let status = match &e {
            ClientError::Status(s) => match s.code() {
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                    StatusCode::FORBIDDEN
                }
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_GATEWAY,
            },
            _ => StatusCode::BAD_GATEWAY,
        };
        Self {
            status,
            message: format!("The node answered: {e}"),
        }
    }
}

impl From<askama::Error> for PageError {
    fn from(e: askama::Error) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("cannot draw the page: {e}"),
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let page = ErrorPage {
            base: Base {
                nav: "",
                regions: Vec::new(),
                region: String::new(),
            },
            message: self.message,
        };
        let body = page.render().unwrap_or_else(|e| e.to_string());
        (self.status, Html(body)).into_response()
    }
}

type Page = Result<Html<String>, PageError>;

fn page(t: &impl Template) -> Page {
    Ok(Html(t.render()?))
}

fn region<'a>(console: &'a Console, name: &str) -> Result<&'a Region, PageError> {
    console.region(name).ok_or_else(|| {
        PageError::bad(format!(
            "no region {name:?} in this console; it reads {}",
            console.region_names().join(", ")
        ))
    })
}

async fn css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS)
}

async fn not_found() -> PageError {
    PageError {
        status: StatusCode::NOT_FOUND,
        message: "There is no such page in the console.".into(),
    }
}

// ---------------------------------------------------------------------------------
// Rows

/// One record as a table row.
struct Row {
    index: u64,
    time: String,
    region: String,
    action: String,
    organization: String,
    professional: String,
    purpose: String,
    decision: String,
    emergency: bool,
    status: String,
    pointers: u32,
    patient: String,
    reviewed: bool,
}

impl Row {
    fn new(r: &Record, reviewed: bool) -> Self {
        Self {
            index: r.index,
            time: r.time.clone(),
            region: r.region.clone(),
            action: r.action.clone(),
            organization: r.organization_named(),
            professional: r.professional_named(),
            purpose: r.purpose(),
            decision: r.decision.outcome.clone(),
            emergency: r.decision.emergency,
            status: r.outcome.status.clone(),
            pointers: r.outcome.pointers,
            patient: r.patient_short(),
            reviewed,
        }
    }
}

fn days_param(days: Option<u32>) -> u32 {
    days.unwrap_or(30).clamp(1, 3660)
}

// ---------------------------------------------------------------------------------
// Overview: the pictures

#[derive(Deserialize, Default)]
#[serde(default)]
struct WindowParams {
    region: String,
    days: Option<u32>,
}

#[derive(Template)]
#[template(path = "console/overview.html")]
struct OverviewPage {
    base: Base,
    days: u32,
    lookups: usize,
    refused: usize,
    emergency: usize,
    awaiting: usize,
    truncated: bool,
    by_day: String,
    by_day_table: Vec<(String, u64, u64, u64)>,
    emergency_weeks: String,
    emergency_table: Vec<(String, u64)>,
    top: String,
    top_table: Vec<(String, u64)>,
}

async fn overview(State(console): State<Arc<Console>>, Query(p): Query<WindowParams>) -> Page {
    let region = region(&console, &p.region)?;
    let days = days_param(p.days);
    let (records, truncated) = region.lookups(days).await?;
    let reviews = region.reviews().await?;
    let today = time::OffsetDateTime::now_utc();
    let dates: Vec<String> = (0..days)
        .rev()
        .map(|d| {
            (today - time::Duration::days(i64::from(d)))
                .date()
                .to_string()
        })
        .collect();
    let position: BTreeMap<&str, usize> = dates
        .iter()
        .enumerate()
        .map(|(i, d)| (d.as_str(), i))
        .collect();
    let mut allowed = vec![0; dates.len()];
    let mut denied = vec![0; dates.len()];
    let mut other = vec![0; dates.len()];
    let mut weeks: BTreeMap<String, u64> = BTreeMap::new();
    let mut top: BTreeMap<String, u64> = BTreeMap::new();
    for r in &records {
        let date = flags::norwegian_time(&r.time).map(|t| t.date());
        if let Some(&i) = date.and_then(|d| position.get(d.to_string().as_str())) {
            match r.decision.outcome.as_str() {
                "allowed" => allowed[i] += 1,
                "denied" => denied[i] += 1,
                _ => other[i] += 1,
            }
        }
        if r.decision.emergency
            && let Some(d) = date
        {
            let (year, week, _) = d.to_iso_week_date();
            *weeks.entry(format!("{year}-W{week:02}")).or_default() += 1;
        }
        if r.action == "lookup" {
            let who = r.professional_named();
            let who = if who.is_empty() {
                r.organization_named()
            } else {
                who
            };
            *top.entry(who).or_default() += 1;
        }
    }
    let mut top: Vec<(String, u64)> = top.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(10);
    let emergency_table: Vec<(String, u64)> = weeks.into_iter().collect();
    let by_day = chart::stacked_bars(
        "Lookups per day by decision",
        &dates,
        &[
            Series {
                name: "allowed",
                colour: chart::BLUE,
                values: allowed.clone(),
            },
            Series {
                name: "refused",
                colour: chart::RED,
                values: denied.clone(),
            },
            Series {
                name: "other",
                colour: chart::GREY,
                values: other.clone(),
            },
        ],
    );
    let week_labels: Vec<String> = emergency_table.iter().map(|(w, _)| w.clone()).collect();
    let emergency_weeks = chart::stacked_bars(
        "Emergency accesses per week",
        &week_labels,
        &[Series {
            name: "emergency access",
            colour: chart::ORANGE,
            values: emergency_table.iter().map(|(_, n)| *n).collect(),
        }],
    );
    let by_day_table = dates
        .iter()
        .enumerate()
        .filter(|(i, _)| allowed[*i] + denied[*i] + other[*i] > 0)
        .map(|(i, d)| (d.clone(), allowed[i], denied[i], other[i]))
        .collect();
    let emergency: Vec<&Record> = records.iter().filter(|r| r.decision.emergency).collect();
    page(&OverviewPage {
        base: Base::new(&console, "overview", region),
        days,
        lookups: records.len(),
        refused: records
            .iter()
            .filter(|r| r.decision.outcome == "denied")
            .count(),
        emergency: emergency.len(),
        awaiting: emergency
            .iter()
            .filter(|r| !reviews.contains_key(&r.index))
            .count(),
        truncated,
        by_day,
        by_day_table,
        emergency_weeks,
        emergency_table,
        top: chart::horizontal_bars("Top requesters", &top, chart::BLUE),
        top_table: top,
    })
}

// ---------------------------------------------------------------------------------
// Search

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct SearchParams {
    region: String,
    patient: String,
    system: String,
    hpr: String,
    organization: String,
    purpose: String,
    decision: String,
    action: String,
    emergency: String,
    from: String,
    to: String,
    page_token: String,
}

#[derive(Template)]
#[template(path = "console/search.html")]
struct SearchPage {
    base: Base,
    q: SearchParams,
    searched: bool,
    rows: Vec<Row>,
    next: String,
}

fn time_param(
    s: &str,
    name: &str,
    end_of_day: bool,
) -> Result<Option<prost_types::Timestamp>, PageError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let mut t = records::parse_time(s).map_err(|e| PageError::bad(format!("{name}: {e}")))?;
    // "To 2026-03-01" means up to the end of that day.
    if end_of_day && s.len() == 10 {
        t.seconds += 86_400;
    }
    Ok(Some(t))
}

impl SearchParams {
    fn filter(&self) -> Result<v1::AuditFilter, PageError> {
        let patient = self.patient.trim();
        let system = self.system.trim();
        Ok(v1::AuditFilter {
            patient: (!patient.is_empty())
                .then(|| records::patient(patient, (!system.is_empty()).then_some(system))),
            hpr_number: self.hpr.trim().to_string(),
            organization_number: self.organization.trim().to_string(),
            purpose_of_use: self.purpose.trim().to_string(),
            decision: self.decision.clone(),
            from: time_param(&self.from, "from", false)?,
            to: time_param(&self.to, "to", true)?,
            actions: match self.action.as_str() {
                "" => Vec::new(),
                "lookups" => vec!["lookup".into(), "federated_lookup".into()],
                a => vec![a.to_string()],
            },
            emergency_only: !self.emergency.is_empty(),
        })
    }

    fn with_page(&self, token: &str) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("region", &self.region),
            ("patient", &self.patient),
            ("system", &self.system),
            ("hpr", &self.hpr),
            ("organization", &self.organization),
            ("purpose", &self.purpose),
            ("decision", &self.decision),
            ("action", &self.action),
            ("emergency", &self.emergency),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if !v.is_empty() {
                q.append_pair(k, v);
            }
        }
        q.append_pair("page_token", token);
        format!("/search?{}", q.finish())
    }
}

async fn search(
    State(console): State<Arc<Console>>,
    Query(q): Query<SearchParams>,
    raw: axum::http::Uri,
) -> Page {
    let region = region(&console, &q.region)?;
    let searched = raw.query().is_some_and(|s| !s.is_empty());
    let (rows, next) = if searched {
        let (records, next) = region
            .search(q.filter()?, PAGE, q.page_token.clone())
            .await?;
        let rows = records.iter().map(|r| Row::new(r, false)).collect();
        let next = if next.is_empty() {
            String::new()
        } else {
            q.with_page(&next)
        };
        (rows, next)
    } else {
        (Vec::new(), String::new())
    };
    page(&SearchPage {
        base: Base::new(&console, "search", region),
        q,
        searched,
        rows,
        next,
    })
}

// ---------------------------------------------------------------------------------
// One record

#[derive(Deserialize)]
struct RecordParams {
    #[serde(default)]
    region: String,
    index: u64,
}

#[derive(Template)]
#[template(path = "console/record.html")]
struct RecordPage {
    base: Base,
    index: u64,
    record: Option<Record>,
    removed: bool,
    json: String,
    proof: Proof,
    reviews: Vec<Record>,
    csrf: String,
}

async fn record(State(console): State<Arc<Console>>, Query(p): Query<RecordParams>) -> Page {
    let region = region(&console, &p.region)?;
    let proven = region.prove(p.index).await?;
    let reviews = region.reviews().await?.remove(&p.index).unwrap_or_default();
    let record = Record::parse(&proven.bytes).ok();
    let json = serde_json::from_slice::<serde_json::Value>(&proven.bytes)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_default();
    page(&RecordPage {
        base: Base::new(&console, "search", region),
        index: p.index,
        removed: proven.bytes.is_empty() && proven.proof.is_verified(),
        record,
        json,
        proof: proven.proof,
        reviews,
        csrf: console.guard.csrf(),
    })
}

#[derive(Deserialize)]
struct ReviewForm {
    #[serde(default)]
    region: String,
    index: u64,
    #[serde(default)]
    note: String,
    #[serde(default)]
    reviewer: String,
    #[serde(default)]
    csrf: String,
}

async fn review(State(console): State<Arc<Console>>, Form(f): Form<ReviewForm>) -> Response {
    if !console.guard.csrf_ok(&f.csrf) {
        return PageError {
            status: StatusCode::FORBIDDEN,
            message: "The form was not the console's own (its token is missing or stale); \
                      open the record again and resubmit."
                .into(),
        }
        .into_response();
    }
    let region = match region(&console, &f.region) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match region
        .client
        .audit_review(f.index, f.note.trim(), f.reviewer.trim())
        .await
    {
        Ok(()) => {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            q.append_pair("region", &region.name);
            q.append_pair("index", &f.index.to_string());
            Redirect::to(&format!("/record?{}", q.finish())).into_response()
        }
        Err(e) => PageError::from(e).into_response(),
    }
}

// ---------------------------------------------------------------------------------
// Log state

struct RegionLog {
    name: String,
    state: LogState,
}

#[derive(Template)]
#[template(path = "console/log.html")]
struct LogPage {
    base: Base,
    logs: Vec<RegionLog>,
}

async fn log_state(State(console): State<Arc<Console>>) -> Page {
    let mut logs = Vec::new();
    for r in &console.regions {
        logs.push(RegionLog {
            name: r.name.clone(),
            state: r.log_state().await,
        });
    }
    page(&LogPage {
        base: Base::new(&console, "log", console.home()),
        logs,
    })
}

// ---------------------------------------------------------------------------------
// The patient report

#[derive(Deserialize, Default)]
#[serde(default)]
struct ReportParams {
    patient: String,
    system: String,
    lang: String,
}

/// One lookup of the patient, as every region that logged it reports it.
struct ReportRow {
    /// RFC 3339, for sorting.
    time: String,
    shown_time: String,
    organization: String,
    professional: String,
    profession: String,
    purpose: String,
    decision: String,
    emergency: bool,
    /// Region, and whether its record is proven: `verified`, `failed` or `unchecked`.
    regions: Vec<(String, &'static str)>,
}

struct Silent {
    region: String,
    detail: String,
}

#[derive(Template)]
#[template(path = "console/report.html")]
struct ReportPage {
    base: Base,
    w: &'static Words,
    lang: &'static str,
    other_lang: &'static str,
    patient: String,
    system: String,
    made: String,
    asked: bool,
    rows: Vec<ReportRow>,
    silent: Vec<Silent>,
    all_verified: bool,
}

async fn report(State(console): State<Arc<Console>>, Query(p): Query<ReportParams>) -> Page {
    let lang = Lang::parse(&p.lang);
    let w = words::words(lang);
    let home = console.home();
    let patient = p.patient.trim().to_string();
    let mut rows: Vec<ReportRow> = Vec::new();
    let mut silent = Vec::new();
    if !patient.is_empty() {
        let system = p.system.trim();
        let resp = home
            .client
            .audit_patient_report(
                records::patient(&patient, (!system.is_empty()).then_some(system)),
                false,
            )
            .await?;
        let mut by_query: BTreeMap<String, usize> = BTreeMap::new();
        let mut proven = 0;
        for part in &resp.regions {
            if !part.answered {
                silent.push(Silent {
                    region: part.region.clone(),
                    detail: part.detail.clone(),
                });
                continue;
            }
            let reader = console
                .region(&part.region)
                .filter(|_| !part.region.is_empty());
            for bytes in &part.records {
                let Ok(r) = Record::parse(bytes) else {
                    continue;
                };
                let check = match reader {
                    Some(reader) if proven < MAX_PROVEN => {
                        proven += 1;
                        if reader.prove(r.index).await?.proof.is_verified() {
                            "verified"
                        } else {
                            "failed"
                        }
                    }
                    _ => "unchecked",
                };
                let key = if r.query_id.is_empty() {
                    format!("{}/{}", part.region, r.index)
                } else {
                    r.query_id.clone()
                };
                let i = *by_query.entry(key).or_insert_with(|| {
                    rows.push(ReportRow {
                        time: r.time.clone(),
                        shown_time: String::new(),
                        organization: String::new(),
                        professional: String::new(),
                        profession: String::new(),
                        purpose: String::new(),
                        decision: String::new(),
                        emergency: false,
                        regions: Vec::new(),
                    });
                    rows.len() - 1
                });
                let row = &mut rows[i];
                // The record of the region the clinician asked names the most; any
                // region's record names the requester.
                if row.organization.is_empty() || r.action == "lookup" {
                    row.time = r.time.clone();
                    row.shown_time = words::local_time(&r.time);
                    row.organization = r.organization_named();
                    row.professional = r.professional_named();
                    row.profession =
                        words::profession(&r.requester_field(|q| q.profession.clone()), lang);
                    row.purpose = words::purpose(&r.purpose(), lang);
                    row.decision = words::decision(&r.decision.outcome, lang);
                    row.emergency = r.decision.emergency;
                }
                row.regions.push((part.region.clone(), check));
            }
        }
        rows.sort_by(|a, b| a.time.cmp(&b.time));
    }
    let all_verified = rows
        .iter()
        .all(|r| r.regions.iter().all(|(_, v)| *v == "verified"));
    let made = words::local_time(
        &time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    );
    page(&ReportPage {
        base: Base::new(&console, "report", home),
        w,
        lang: lang.code(),
        other_lang: if lang == Lang::Nb { "en" } else { "nb" },
        asked: !patient.is_empty(),
        patient,
        system: p.system,
        made,
        rows,
        silent,
        all_verified,
    })
}

// ---------------------------------------------------------------------------------
// Follow-up

#[derive(Template)]
#[template(path = "console/follow_up.html")]
struct FollowUpPage {
    base: Base,
    days: u32,
    awaiting: Vec<Row>,
    reviewed: usize,
    refused: Vec<Row>,
    flags: Vec<Flag>,
    thresholds: Thresholds,
    truncated: bool,
}

async fn follow_up(State(console): State<Arc<Console>>, Query(p): Query<WindowParams>) -> Page {
    let region = region(&console, &p.region)?;
    let days = days_param(p.days);
    let reviews = region.reviews().await?;
    let lookups = || vec!["lookup".to_string(), "federated_lookup".to_string()];
    let (emergency, _) = region
        .search(
            v1::AuditFilter {
                actions: lookups(),
                emergency_only: true,
                ..Default::default()
            },
            1000,
            String::new(),
        )
        .await?;
    let reviewed_set: BTreeSet<u64> = reviews.keys().copied().collect();
    let (awaiting, done): (Vec<&Record>, Vec<&Record>) = emergency
        .iter()
        .partition(|r| !reviewed_set.contains(&r.index));
    let (refused, _) = region
        .search(
            v1::AuditFilter {
                actions: lookups(),
                decision: "denied".into(),
                ..Default::default()
            },
            100,
            String::new(),
        )
        .await?;
    let thresholds = Thresholds::default();
    let (window, truncated) = region.lookups(days).await?;
    page(&FollowUpPage {
        base: Base::new(&console, "follow-up", region),
        days,
        awaiting: awaiting.iter().map(|r| Row::new(r, false)).collect(),
        reviewed: done.len(),
        refused: refused
            .iter()
            .map(|r| Row::new(r, reviewed_set.contains(&r.index)))
            .collect(),
        flags: flags::flags(&window, &thresholds),
        thresholds,
        truncated,
    })
}

/// For templates: a head's fields, or the reason there is none.
impl HeadView {
    fn short_root(&self) -> String {
        self.root.chars().take(16).collect()
    }
}

impl Consistency {
    fn class(&self) -> &'static str {
        match self {
            Consistency::FirstSeen | Consistency::Consistent => "ok",
            Consistency::Broken(_) => "bad",
            Consistency::Unknown(_) => "warn",
        }
    }
}
