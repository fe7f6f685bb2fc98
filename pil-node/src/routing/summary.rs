//! A region's membership summary: which tokens it may hold anything for, and how
//! current that is.
//!
//! The summary is a binary fuse filter (16-bit fingerprints: about 18 bits per
//! patient, a false-positive rate near 2^-16) over the region's tokens as of when it
//! was built, plus the tokens of patients added since, exactly. A filter cannot take
//! additions, so new patients go to `added` until the next build; a patient who no
//! longer has anything stays a (harmless) positive until then. [`route`] decides
//! whether a lookup asks the region: a summary older than the staleness bound, or
//! none, means "may hold anything".

use std::collections::BTreeSet;

use xorf::{BinaryFuse16, Filter};

use super::tokens::Token;

/// Why a summary could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SummaryError {
    #[error("the summary's filter could not be built over {0} tokens")]
    Build(usize),
}

/// What one region holds, as another region sees it.
pub struct Summary {
    /// `None` when the region held nothing at the build.
    filter: Option<BinaryFuse16>,
    added: BTreeSet<Token>,
    /// When the region made this summary (its whole content, `added` included),
    /// nanoseconds since the epoch.
    pub as_of: i64,
    /// Tokens the filter was built over.
    pub built_over: usize,
}

impl Summary {
    /// A summary of `tokens` as of `as_of`.
    pub fn build(tokens: &[Token], as_of: i64) -> Result<Self, SummaryError> {
        let mut keys = tokens.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let filter = if keys.is_empty() {
            None
        } else {
            Some(BinaryFuse16::try_from(&keys).map_err(|_| SummaryError::Build(keys.len()))?)
        };
        Ok(Self {
            filter,
            added: BTreeSet::new(),
            as_of,
            built_over: keys.len(),
        })
    }

    /// Patients added since the build, as of `as_of`.
    pub fn add(&mut self, tokens: impl IntoIterator<Item = Token>, as_of: i64) {
        self.added.extend(tokens);
        self.as_of = self.as_of.max(as_of);
    }

    /// Whether the region may hold anything for `token` (false positives at about
    /// 2^-16; never a false negative for a token it was built or added with).
    pub fn may_hold(&self, token: Token) -> bool {
        self.added.contains(&token) || self.filter.as_ref().is_some_and(|f| f.contains(&token))
    }

    /// Bytes the filter takes.
    pub fn filter_bytes(&self) -> usize {
        self.filter.as_ref().map_or(0, |f| f.fingerprints.len() * 2)
    }
}

/// Whether a lookup asks a region, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Its summary says it may hold the patient.
    MayHold,
    /// Its summary is older than the bound (or in the future: a clock to distrust):
    /// asked, as if it might hold anything.
    Stale,
    /// No summary from it: asked.
    NoSummary,
    /// Its current summary says it holds nothing about the patient: not asked.
    HoldsNothing,
}

impl Route {
    pub fn asks(self) -> bool {
        !matches!(self, Route::HoldsNothing)
    }
}

/// How a lookup at `now` treats a region with `summary` for `token`, given the
/// staleness bound (nanoseconds).
pub fn route(summary: Option<&Summary>, token: Token, now: i64, bound: i64) -> Route {
    let Some(summary) = summary else {
        return Route::NoSummary;
    };
    let age = now - summary.as_of;
    if !(0..=bound).contains(&age) {
        return Route::Stale;
    }
    if summary.may_hold(token) {
        Route::MayHold
    } else {
        Route::HoldsNothing
    }
}

#[cfg(test)]
mod tests {
    use pil_proto::ident::{PatientId, SYSTEM_FNR, synthetic_fnr};
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::routing::tokens::RoutingKey;

    const SECOND: i64 = 1_000_000_000;

    fn patient(seed: u64) -> PatientId {
        PatientId::parse(SYSTEM_FNR, &synthetic_fnr(seed), true).unwrap()
    }

    #[test]
    fn every_patient_held_is_found_and_few_others_are() {
        let region = RoutingKey::from_seed(&[9; 32]).unwrap();
        let held: Vec<Token> = (0..5_000)
            .map(|i| region.token(&patient(i)).unwrap())
            .collect();
        let mut summary = Summary::build(&held, 10 * SECOND).unwrap();
        let later = region.token(&patient(1_000_000)).unwrap();
        assert!(!summary.may_hold(later));
        summary.add([later], 11 * SECOND);
        assert_eq!(summary.as_of, 11 * SECOND);
        assert!(held.iter().chain([&later]).all(|t| summary.may_hold(*t)));
        let others = (5_000..55_000u64)
            .filter(|i| summary.may_hold(region.token(&patient(*i)).unwrap()))
            .count();
        // 2^-16 of 50,000 is under one; allow a few.
        assert!(others <= 5, "{others} false positives in 50,000");
        assert!(
            summary.filter_bytes() < 5_000 * 3,
            "{} bytes",
            summary.filter_bytes()
        );
    }

    #[test]
    fn a_stale_missing_or_future_summary_asks_and_a_fresh_one_may_skip() {
        let summary = Summary::build(&[1, 2, 3], 100 * SECOND).unwrap();
        let bound = 5 * SECOND;
        assert_eq!(route(None, 1, 100 * SECOND, bound), Route::NoSummary);
        assert_eq!(
            route(Some(&summary), 1, 102 * SECOND, bound),
            Route::MayHold
        );
        assert_eq!(
            route(Some(&summary), 9, 102 * SECOND, bound),
            Route::HoldsNothing
        );
        assert!(!Route::HoldsNothing.asks());
        assert_eq!(route(Some(&summary), 9, 106 * SECOND, bound), Route::Stale);
        assert_eq!(route(Some(&summary), 9, 99 * SECOND, bound), Route::Stale);
        for r in [Route::NoSummary, Route::MayHold, Route::Stale] {
            assert!(r.asks());
        }
        let empty = Summary::build(&[], 100 * SECOND).unwrap();
        assert_eq!(
            route(Some(&empty), 1, 100 * SECOND, bound),
            Route::HoldsNothing
        );
    }

    /// A peer's operator with the summary but not the region's key tries to list the
    /// region's patients by trying every identifier with every token function it can
    /// compute (hashes of the identifier, the OPRF under a key of its own): it finds
    /// no more than the false-positive rate lets through.
    #[test]
    fn a_summary_cannot_be_tested_offline() {
        let region = RoutingKey::from_seed(&[5; 32]).unwrap();
        let held: Vec<Token> = (0..2_000)
            .map(|i| region.token(&patient(i)).unwrap())
            .collect();
        let summary = Summary::build(&held, 0).unwrap();
        let own_key = RoutingKey::from_seed(&[6; 32]).unwrap();
        let guesses: [&dyn Fn(&PatientId) -> Token; 2] = [
            &|p| {
                let d = Sha256::digest(p.value().as_bytes());
                u64::from_be_bytes(d[..8].try_into().unwrap())
            },
            &|p| own_key.token(p).unwrap(),
        ];
        for guess in guesses {
            let found = (0..20_000u64)
                .filter(|i| summary.may_hold(guess(&patient(*i))))
                .count();
            assert!(found <= 3, "{found} of 20,000 tried identifiers matched");
        }
    }
}
