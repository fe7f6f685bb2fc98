//! What a region publishes for routing: its tokens, kept current, and the summary
//! built over them that peers fetch.
//!
//! Every write covers its patients first ([`Coverage`]): the patient's token is
//! stored before the write is acknowledged, so a summary read after the
//! acknowledgement holds it. Tokens live in the store (every node of a region on one
//! database sees every node's), each at a position; a peer fetches the filter once per
//! build and then only the tokens at positions after the last it has. A new routing
//! key (or a store that never had tokens) is covered by a walk over every stored
//! patient; until the walk is done the region publishes no summary, and peers ask it
//! about every patient.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use pil_proto::ident::PatientId;
use rand::RngCore;

use super::{
    summary::{Summary, SummaryError},
    tokens::{RoutingKey, Token, TokenError},
};
use crate::{
    patient_keys::Pseudonym,
    registry::{Coverage, Registry},
    store::{Sealed, Store, StoreError, routing_key_walking},
};

/// Tokens read from the store per call.
const PAGE: usize = 100_000;
/// Patients walked per step when every stored patient is covered.
const WALK_PAGE: usize = 1000;
/// Tokens a peer is sent after the filter in one answer; more take another call.
pub const MAX_ADDED: usize = 50_000;
/// How often the build is checked against what came since.
const REBUILD_CHECK: Duration = Duration::from_secs(5);

/// Why a summary cannot be given.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "this region's routing summary is being built ({0} patients covered so far); ask it \
         about every patient meanwhile"
    )]
    Building(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Summary(#[from] SummaryError),
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// One build of the summary: the filter over every token up to a position.
pub struct Build {
    /// Changes with every build (and key), so a peer knows its filter is old.
    pub id: String,
    pub upto: u64,
    /// The filter as peers are sent it.
    pub filter: Vec<u8>,
    pub patients: u64,
}

/// What a peer is sent when it asks for the summary.
pub struct Published {
    pub key_id: String,
    pub build: Arc<Build>,
    /// Whether the filter is included (the peer's build is another).
    pub with_filter: bool,
    /// Tokens after the filter or after the peer's position.
    pub added: Vec<Token>,
    /// Where the peer stands after this.
    pub position: u64,
    /// Whether everything stored by now is included (else ask again at once).
    pub complete: bool,
}

/// A region's routing state: its key, the tokens it has stored, its current build.
pub struct Publisher {
    key: RoutingKey,
    store: Arc<dyn Store>,
    /// Patients (by pseudonym) whose token is stored: skips the OPRF on later writes.
    covered: Mutex<HashSet<Pseudonym>>,
    /// Every token stored, up to `seen`.
    tokens: Mutex<Tokens>,
    build: Mutex<Option<Arc<Build>>>,
    walked: std::sync::atomic::AtomicU64,
    /// Woken when this node stores new tokens, for peers waiting on them.
    added: tokio::sync::Notify,
}

#[derive(Default)]
struct Tokens {
    all: HashSet<Token>,
    seen: u64,
}

impl Publisher {
    /// The publisher for `key`. When the stored tokens are under another key (or
    /// none), they are forgotten and the store marked as being walked under this one,
    /// before any write: from here on every write covers its patients under this key.
    pub async fn open(key: RoutingKey, store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let id = key.id().to_string();
        let stored = store.routing_key_id().await?;
        if stored.as_deref() != Some(id.as_str())
            && stored.as_deref() != Some(routing_key_walking(&id).as_str())
        {
            store
                .set_routing_key(routing_key_walking(&id), true)
                .await?;
        }
        Ok(Arc::new(Self {
            key,
            store,
            covered: Mutex::default(),
            tokens: Mutex::default(),
            build: Mutex::new(None),
            walked: Default::default(),
            added: tokio::sync::Notify::new(),
        }))
    }

    pub fn key(&self) -> &RoutingKey {
        &self.key
    }

    /// Gets the store's tokens ready (walking every stored patient when they were
    /// made under another key, or never), builds the first summary, and keeps it
    /// current.
    pub async fn run(self: Arc<Self>, registry: Registry) {
        loop {
            match self.prepare(&registry).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(error = %e, "the routing summary could not be prepared; retrying in 5 s");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
        loop {
            tokio::time::sleep(REBUILD_CHECK).await;
            if let Err(e) = self.refresh(false).await {
                tracing::warn!(error = %e, "the routing summary could not be rebuilt");
            }
        }
    }

    async fn prepare(&self, registry: &Registry) -> Result<(), PublishError> {
        let id = self.key.id().to_string();
        let stored = self.store.routing_key_id().await?;
        if stored.as_deref() != Some(id.as_str()) {
            let unidentified = self.walk(registry).await?;
            if unidentified > 0 {
                // Walked again at the next start; meanwhile peers are told nothing
                // (see `ready`), so they ask this region about every patient.
                tracing::error!(
                    unidentified,
                    "entries without an identifier cannot be routed to; this region \
                     publishes no summary, so every peer keeps asking it"
                );
                return Ok(());
            }
            self.store.set_routing_key(id, false).await?;
        }
        self.refresh(true).await?;
        tracing::info!(key = %self.key.id(), "routing summary published");
        Ok(())
    }

    /// Covers every stored patient; returns how many could not be identified.
    async fn walk(&self, registry: &Registry) -> Result<u64, PublishError> {
        let mut after = None;
        let mut unidentified = 0;
        loop {
            let page = registry.stored_patients(after, WALK_PAGE).await?;
            let Some(last) = page.last() else {
                return Ok(unidentified);
            };
            after = Some(last.pseudonym);
            let keys = registry.keys();
            let mut patients = Vec::with_capacity(page.len());
            for p in &page {
                let opened = match &p.sealed {
                    Some(Sealed::Current(s)) => keys.open(s, &p.pseudonym).ok(),
                    Some(Sealed::Format1(s)) => keys.open_format1(s, &p.pseudonym).ok(),
                    None => None,
                };
                match opened
                    .and_then(|(system, value)| PatientId::parse(&system, &value, true).ok())
                {
                    Some(id) => patients.push((p.pseudonym, id)),
                    None => unidentified += 1,
                }
            }
            self.walked
                .fetch_add(page.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.cover(patients).await?;
        }
    }

    /// Reads tokens stored since the last read (by any node of the region) and, when
    /// `rebuild` or enough came since the build, builds the filter again.
    async fn refresh(&self, rebuild: bool) -> Result<(), PublishError> {
        loop {
            let after = self.lock_tokens().seen;
            let page = self.store.routing_tokens(after, PAGE).await?;
            let full = page.len() == PAGE;
            {
                let mut t = self.lock_tokens();
                for (position, token) in page {
                    t.all.insert(token);
                    t.seen = t.seen.max(position);
                }
            }
            if !full {
                break;
            }
        }
        let (seen, count) = {
            let t = self.lock_tokens();
            (t.seen, t.all.len() as u64)
        };
        let current = self.current();
        let due = match &current {
            None => true,
            Some(b) => {
                let since = count.saturating_sub(b.patients);
                rebuild || since > 1000.max(b.patients / 10)
            }
        };
        if !due {
            return Ok(());
        }
        let tokens: Vec<Token> = self.lock_tokens().all.iter().copied().collect();
        let summary = Summary::build(&tokens, 0)?;
        let mut id = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut id);
        let build = Build {
            id: format!("{}-{}", self.key.id(), hex::encode(id)),
            upto: seen,
            filter: summary.encode_filter(),
            patients: summary.built_over as u64,
        };
        *self.build.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(build));
        Ok(())
    }

    fn lock_tokens(&self) -> std::sync::MutexGuard<'_, Tokens> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> Option<Arc<Build>> {
        self.build.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The summary for a peer that holds build `build` up to `after`, waiting up to
    /// `wait` for a new token when there is none (tokens stored by other nodes of the
    /// region are seen when the wait ends).
    pub async fn published_when_new(
        &self,
        build: &str,
        after: u64,
        wait: Duration,
    ) -> Result<Published, PublishError> {
        let added = self.added.notified();
        tokio::pin!(added);
        added.as_mut().enable();
        let first = self.published(build, after).await?;
        if first.with_filter || !first.added.is_empty() || wait.is_zero() {
            return Ok(first);
        }
        let _ = tokio::time::timeout(wait, added).await;
        self.published(build, after).await
    }

    /// The summary for a peer that holds build `build` up to `after`.
    pub async fn published(&self, build: &str, after: u64) -> Result<Published, PublishError> {
        let Some(current) = self.current() else {
            return Err(PublishError::Building(
                self.walked.load(std::sync::atomic::Ordering::Relaxed),
            ));
        };
        // Another node of the region may have moved the tokens to a new key: this
        // node's build and evaluations would then not match them.
        let stored = self.store.routing_key_id().await?;
        crate::store::routing_key_matches(stored.as_deref(), self.key.id())?;
        let with_filter = build != current.id;
        let from = if with_filter {
            current.upto
        } else {
            after.max(current.upto)
        };
        let page = self.store.routing_tokens(from, MAX_ADDED).await?;
        let complete = page.len() < MAX_ADDED;
        let position = page.last().map_or(from, |(p, _)| *p);
        Ok(Published {
            key_id: self.key.id().to_string(),
            build: current,
            with_filter,
            added: page.into_iter().map(|(_, t)| t).collect(),
            position,
            complete,
        })
    }

    /// Evaluates blinded tokens for a peer.
    pub fn evaluate(&self, blinded: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, TokenError> {
        blinded
            .iter()
            .map(|b| self.key.evaluate_blinded(b))
            .collect()
    }

    /// Patients whose tokens are stored, as far as this node knows.
    pub fn patients(&self) -> u64 {
        self.lock_tokens().all.len() as u64
    }
}

#[async_trait::async_trait]
impl Coverage for Publisher {
    fn covers(&self, pseudonym: &Pseudonym) -> bool {
        self.covered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(pseudonym)
    }

    async fn cover(&self, patients: Vec<(Pseudonym, PatientId)>) -> Result<(), StoreError> {
        let mut new = Vec::new();
        for (_, id) in &patients {
            let token = self.key.token(id).map_err(StoreError::engine)?;
            if !self.lock_tokens().all.contains(&token) {
                new.push(token);
            }
        }
        if !new.is_empty() {
            self.store
                .add_routing_tokens(self.key.id().to_string(), new.clone())
                .await?;
            // Known stored from here; `seen` moves only by reading positions.
            self.lock_tokens().all.extend(new);
            self.added.notify_waiters();
        }
        let mut covered = self.covered.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: a pseudonym forgotten only costs its next write an OPRF.
        if covered.len() > 2_000_000 {
            covered.clear();
        }
        covered.extend(patients.into_iter().map(|(p, _)| p));
        Ok(())
    }
}
