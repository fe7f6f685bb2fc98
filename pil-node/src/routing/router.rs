//! The home node's side of routing: every peer's summary kept current, the tokens of
//! the patients looked up here, and which peers a lookup asks.
//!
//! A summary counts as current for the staleness bound after this node *asked* for
//! it: the peer answers with everything stored before it answered, so a pointer
//! acknowledged at the peer longer than the bound ago is in any summary still
//! trusted. Measured on this node's monotonic clock, so no two clocks need agree.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use pil_proto::{ident::PatientId, v1};

use super::{
    summary::{FILTER_ENCODING, Summary},
    tokens::{Token, blind},
};
use crate::{federation::Federation, metrics::Metrics, patient_keys::Pseudonym};

/// Calls per refresh before a peer that keeps saying "more" is left for the next one.
const MAX_PAGES: usize = 20;
/// Tokens remembered per peer; past it the cache starts again.
const TOKEN_CACHE: usize = 200_000;
/// Blinded elements per exchange (what a peer takes in one call).
const MAX_EVALUATIONS: usize = 256;
/// Longest a lookup waits for a peer to evaluate a token before asking it directly.
const EVALUATION_DEADLINE: Duration = Duration::from_millis(500);

/// What this node holds of one peer's summary.
#[derive(Default)]
struct Held {
    summary: Option<Summary>,
    key_id: String,
    build: String,
    position: u64,
    /// When this node asked for the summary it holds.
    asked: Option<Instant>,
    /// Why the last refresh failed, if it did.
    detail: String,
    /// Tokens of patients looked up here, under `key_id`, by this node's pseudonym.
    tokens: HashMap<Pseudonym, Token>,
}

/// A peer's summary as `pil peers` shows it.
#[derive(Debug, Clone, Default)]
pub struct SummaryView {
    /// "fresh", "stale" or "none".
    pub state: &'static str,
    pub age: Option<Duration>,
    pub bound: Duration,
    pub patients: u64,
    pub filter_bytes: u64,
    pub key_id: String,
    pub detail: String,
}

/// How a lookup treats each peer: those in `skip` are not asked (and why).
#[derive(Debug, Default)]
pub struct Routes {
    pub skip: HashMap<String, String>,
}

/// The peers' summaries and the token exchange with them.
pub struct Router {
    federation: Arc<Federation>,
    metrics: Arc<Metrics>,
    peers: Mutex<HashMap<String, Held>>,
    /// Woken when a peer's summary takes in new tokens (or a new build).
    grown: tokio::sync::Notify,
}

impl Router {
    pub fn new(federation: Arc<Federation>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            federation,
            metrics,
            peers: Mutex::default(),
            grown: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Woken when any peer's summary may hold more patients than before.
    pub fn grown(&self) -> &tokio::sync::Notify {
        &self.grown
    }

    fn bound(&self) -> Duration {
        Duration::from_millis(self.federation.config().summary_staleness_bound_ms)
    }

    /// Keeps every peer's summary current: one task per peer, asking again as soon as
    /// an answer comes (the peer holds the call open until it stores a new token, up
    /// to `summary_refresh_ms`), and after a failure once that time has passed.
    pub async fn run(self: Arc<Self>) {
        // Aborted with this task (when the node stops).
        struct Task(tokio::task::JoinHandle<()>);
        impl Drop for Task {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let mut running: HashMap<String, Task> = HashMap::new();
        loop {
            let regions = self.federation.regions();
            self.lock().retain(|r, _| regions.contains(r));
            running.retain(|r, t| regions.contains(r) && !t.0.is_finished());
            for region in regions {
                if let std::collections::hash_map::Entry::Vacant(slot) = running.entry(region) {
                    let this = self.clone();
                    let region = slot.key().clone();
                    slot.insert(Task(tokio::spawn(async move {
                        loop {
                            let every = Duration::from_millis(
                                this.federation.config().summary_refresh_ms.max(50),
                            );
                            let started = Instant::now();
                            let ok = this.refresh(&region, every).await;
                            if !ok || started.elapsed() < Duration::from_millis(20) {
                                tokio::time::sleep(if ok {
                                    Duration::from_millis(20)
                                } else {
                                    every
                                })
                                .await;
                            }
                        }
                    })));
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Brings one peer's summary up to date, the peer waiting up to `wait` for news;
    /// false when it failed.
    pub async fn refresh(&self, region: &str, wait: Duration) -> bool {
        let mut ok = false;
        for _ in 0..MAX_PAGES {
            let (build, after) = {
                let mut peers = self.lock();
                let held = peers.entry(region.to_string()).or_default();
                (held.build.clone(), held.position)
            };
            // A summary held can be renewed by a waiting call; none, at once.
            let wait_ms = if build.is_empty() {
                0
            } else {
                wait.as_millis() as u32
            };
            let asked = Instant::now();
            let answer = self
                .federation
                .summary_of(
                    region,
                    v1::GetSummaryRequest {
                        build,
                        after,
                        wait_ms,
                    },
                    wait + Duration::from_secs(2),
                )
                .await;
            let grew = answer
                .as_ref()
                .is_ok_and(|a| a.with_filter || !a.added.is_empty());
            let mut peers = self.lock();
            let held = peers.entry(region.to_string()).or_default();
            let applied = answer
                .map_err(|e| e.to_string())
                .and_then(|a| apply(held, a));
            if grew && applied.is_ok() {
                self.grown.notify_waiters();
            }
            match applied {
                Ok(true) => {
                    held.asked = Some(asked);
                    held.detail.clear();
                    ok = true;
                    break;
                }
                Ok(false) => continue,
                Err(why) => {
                    held.detail = why;
                    break;
                }
            }
        }
        let age = self
            .lock()
            .get(region)
            .and_then(|h| h.summary.as_ref().and(h.asked))
            .map(|t| t.elapsed());
        self.metrics.summary_age(region, age);
        ok
    }

    /// Which peers a lookup of `patient` (`pseudonym` here) need not ask: those whose
    /// current summary cannot hold it. Every other peer is asked: one whose summary
    /// may hold the patient, is stale or missing, or whose token could not be had.
    pub async fn route(&self, patient: &PatientId, pseudonym: Pseudonym, all: bool) -> Routes {
        let mut routes = Routes::default();
        let bound = self.bound();
        let mut need = Vec::new();
        for region in self.federation.regions() {
            if all {
                self.metrics.routed(&region, "all_regions");
                continue;
            }
            let known = {
                let peers = self.lock();
                match peers.get(&region) {
                    Some(h) if h.summary.is_some() && fresh(h, bound) => {
                        Some(h.tokens.get(&pseudonym).copied())
                    }
                    Some(h) if h.summary.is_some() => None,
                    _ => {
                        drop(peers);
                        self.metrics.routed(&region, "no_summary");
                        continue;
                    }
                }
            };
            match known {
                None => self.metrics.routed(&region, "stale"),
                Some(Some(token)) => self.decide(&region, token, bound, &mut routes),
                Some(None) => need.push(region),
            }
        }
        let evaluations = need.into_iter().map(|region| async move {
            let token = self
                .evaluate(&region, &[(pseudonym, patient)])
                .await
                .pop()
                .flatten();
            (region, token)
        });
        for (region, token) in futures::future::join_all(evaluations).await {
            match token {
                Some(token) => self.decide(&region, token, bound, &mut routes),
                None => self.metrics.routed(&region, "no_token"),
            }
        }
        routes
    }

    fn decide(&self, region: &str, token: Token, bound: Duration, routes: &mut Routes) {
        let peers = self.lock();
        let Some(held) = peers.get(region) else {
            return;
        };
        let (Some(summary), true) = (&held.summary, fresh(held, bound)) else {
            drop(peers);
            self.metrics.routed(region, "stale");
            return;
        };
        if summary.may_hold(token) {
            drop(peers);
            self.metrics.routed(region, "may_hold");
            return;
        }
        let age = held.asked.map_or(0, |t| t.elapsed().as_millis());
        drop(peers);
        self.metrics.routed(region, "holds_nothing");
        routes.skip.insert(
            region.to_string(),
            format!(
                "not asked: its routing summary ({age} ms old; trusted for {} ms) says it \
                 holds nothing about the patient",
                bound.as_millis()
            ),
        );
    }

    /// For each patient, whether `region` may hold something about it: false only
    /// when its summary is current and holds nothing for the patient's token. Tokens
    /// not known yet are had in one blinded exchange.
    pub async fn may_hold(&self, region: &str, patients: &[(Pseudonym, PatientId)]) -> Vec<bool> {
        let bound = self.bound();
        let mut tokens: Vec<Option<Token>> = {
            let peers = self.lock();
            match peers.get(region) {
                Some(h) if h.summary.is_some() && fresh(h, bound) => patients
                    .iter()
                    .map(|(p, _)| h.tokens.get(p).copied())
                    .collect(),
                _ => return vec![true; patients.len()],
            }
        };
        let missing: Vec<usize> = (0..patients.len())
            .filter(|&i| tokens[i].is_none())
            .collect();
        for chunk in missing.chunks(MAX_EVALUATIONS) {
            let asked: Vec<(Pseudonym, &PatientId)> = chunk
                .iter()
                .map(|&i| (patients[i].0, &patients[i].1))
                .collect();
            for (&i, token) in chunk.iter().zip(self.evaluate(region, &asked).await) {
                tokens[i] = token;
            }
        }
        let peers = self.lock();
        let Some(held) = peers.get(region) else {
            return vec![true; patients.len()];
        };
        match (&held.summary, fresh(held, bound)) {
            (Some(summary), true) => tokens
                .into_iter()
                .map(|t| t.is_none_or(|t| summary.may_hold(t)))
                .collect(),
            _ => vec![true; patients.len()],
        }
    }

    /// The peer's tokens for the patients, by one blinded exchange; remembered. `None`
    /// for each when the peer did not answer.
    async fn evaluate(
        &self,
        region: &str,
        patients: &[(Pseudonym, &PatientId)],
    ) -> Vec<Option<Token>> {
        let none = || vec![None; patients.len()];
        let Ok(blinded) = patients
            .iter()
            .map(|(_, id)| blind(id))
            .collect::<Result<Vec<_>, _>>()
        else {
            return none();
        };
        let (states, messages): (Vec<_>, Vec<_>) = blinded.into_iter().unzip();
        let answer = self
            .federation
            .evaluate_at(
                region,
                v1::EvaluateTokensRequest { blinded: messages },
                EVALUATION_DEADLINE,
            )
            .await;
        let answer = match answer {
            Ok(a) if a.evaluated.len() == patients.len() => a,
            Ok(a) => {
                tracing::debug!(peer = %region, asked = patients.len(), answered = a.evaluated.len(), "routing tokens not all evaluated; the peer is asked");
                return none();
            }
            Err(e) => {
                tracing::debug!(peer = %region, error = %e, "routing token not evaluated; the peer is asked");
                return none();
            }
        };
        let tokens: Vec<Option<Token>> = states
            .into_iter()
            .zip(&answer.evaluated)
            .map(|(state, evaluated)| state.finalize(evaluated).ok())
            .collect();
        let mut peers = self.lock();
        let Some(held) = peers.get_mut(region) else {
            return none();
        };
        // Under another key than the summary's, the tokens mean nothing to it.
        if held.key_id != answer.key_id {
            return none();
        }
        if held.tokens.len() + patients.len() > TOKEN_CACHE {
            held.tokens.clear();
        }
        for ((pseudonym, _), token) in patients.iter().zip(&tokens) {
            if let Some(token) = token {
                held.tokens.insert(*pseudonym, *token);
            }
        }
        tokens
    }

    /// Every peer's summary as this node holds it, by region.
    pub fn views(&self) -> HashMap<String, SummaryView> {
        let bound = self.bound();
        self.lock()
            .iter()
            .map(|(region, h)| {
                let state = match &h.summary {
                    None => "none",
                    Some(_) if fresh(h, bound) => "fresh",
                    Some(_) => "stale",
                };
                let view = SummaryView {
                    state,
                    age: h.summary.as_ref().and(h.asked).map(|t| t.elapsed()),
                    bound,
                    patients: h
                        .summary
                        .as_ref()
                        .map_or(0, |s| (s.built_over + s.added()) as u64),
                    filter_bytes: h.summary.as_ref().map_or(0, |s| s.filter_bytes() as u64),
                    key_id: h.key_id.clone(),
                    detail: h.detail.clone(),
                };
                (region.clone(), view)
            })
            .collect()
    }
}

fn fresh(held: &Held, bound: Duration) -> bool {
    held.asked.is_some_and(|t| t.elapsed() <= bound)
}

/// Takes in one answer; true when it brought the summary up to everything the peer
/// had stored when it answered.
fn apply(held: &mut Held, answer: v1::GetSummaryResponse) -> Result<bool, String> {
    if answer.key_id != held.key_id {
        held.tokens.clear();
        held.key_id = answer.key_id.clone();
    }
    if answer.with_filter {
        if answer.filter_encoding != FILTER_ENCODING {
            held.summary = None;
            held.build.clear();
            return Err(format!(
                "its summary is encoded as {:?}, not {FILTER_ENCODING:?}",
                answer.filter_encoding
            ));
        }
        match Summary::decode(&answer.filter, answer.patients as usize, 0) {
            Ok(s) => held.summary = Some(s),
            Err(e) => {
                held.summary = None;
                held.build.clear();
                return Err(e.to_string());
            }
        }
        held.build = answer.build;
    } else if answer.build != held.build || held.summary.is_none() {
        // Not the build this node holds: start again with the whole filter.
        held.summary = None;
        held.build.clear();
        held.position = 0;
        return Err("its summary changed build without sending it".into());
    }
    if let Some(summary) = held.summary.as_mut() {
        summary.add(answer.added, 0);
    }
    held.position = answer.position;
    Ok(answer.complete)
}
