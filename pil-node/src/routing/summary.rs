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
    #[error("the summary's filter is not a binary fuse filter in PIL's encoding: {0}")]
    Encoding(String),
}

/// The filter's encoding as the wire names it.
pub const FILTER_ENCODING: &str = "binary-fuse16/bincode2-fixint";

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_fixed_int_encoding()
        .with_little_endian()
        .with_limit::<{ 64 << 20 }>()
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

    /// The filter as it is sent (empty when the region held nothing).
    pub fn encode_filter(&self) -> Vec<u8> {
        match &self.filter {
            None => Vec::new(),
            Some(f) => bincode::encode_to_vec(f, bincode_config()).unwrap_or_default(),
        }
    }

    /// A summary from a filter as it was sent, over `built_over` tokens.
    pub fn decode(filter: &[u8], built_over: usize, as_of: i64) -> Result<Self, SummaryError> {
        let filter = if filter.is_empty() {
            None
        } else {
            let (f, used): (BinaryFuse16, usize) =
                bincode::decode_from_slice(filter, bincode_config())
                    .map_err(|e| SummaryError::Encoding(e.to_string()))?;
            if used != filter.len() {
                return Err(SummaryError::Encoding(format!(
                    "{} bytes after the filter",
                    filter.len() - used
                )));
            }
            check_shape(filter, f.fingerprints.len())?;
            Some(f)
        };
        Ok(Self {
            filter,
            added: BTreeSet::new(),
            as_of,
            built_over,
        })
    }

    /// Tokens added since the build.
    pub fn added(&self) -> usize {
        self.added.len()
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

/// Refuses a filter whose lookups would index outside its fingerprints: its shape
/// (after the 8-byte seed: segment length, its mask, the segments' length, each a
/// little-endian u32) must be one a build makes.
fn check_shape(encoded: &[u8], fingerprints: usize) -> Result<(), SummaryError> {
    let field = |at: usize| {
        encoded
            .get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| SummaryError::Encoding("too short".into()))
    };
    let (length, mask, count_length) = (field(8)?, field(12)?, field(16)?);
    let reach = u64::from(count_length) + 2 * u64::from(length);
    let fits = length.is_power_of_two()
        && mask == length - 1
        && count_length % length == 0
        && reach <= u64::from(u32::MAX)
        && reach <= fingerprints as u64;
    if fits {
        Ok(())
    } else {
        Err(SummaryError::Encoding(
            "its segments do not fit its fingerprints".into(),
        ))
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
    fn a_summary_survives_its_wire_form_and_a_malformed_one_is_refused() {
        let tokens: Vec<Token> = (1..=3000u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let built = Summary::build(&tokens, 0).unwrap();
        let wire = built.encode_filter();
        assert!(wire.len() < 3000 * 3, "{} bytes", wire.len());
        let back = Summary::decode(&wire, built.built_over, 7).unwrap();
        assert!(tokens.iter().all(|t| back.may_hold(*t)));
        assert_eq!(back.as_of, 7);
        assert!(Summary::decode(&[], 0, 0).unwrap().filter.is_none());
        assert!(Summary::decode(&wire[..wire.len() - 1], 0, 0).is_err());
        let mut longer = wire.clone();
        longer.push(0);
        assert!(Summary::decode(&longer, 0, 0).is_err());
        // A segment length past the fingerprints would index outside them.
        let mut bent = wire.clone();
        bent[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
        assert!(Summary::decode(&bent, 0, 0).is_err());
        let mut unmasked = wire;
        unmasked[12..16].copy_from_slice(&0u32.to_le_bytes());
        assert!(Summary::decode(&unmasked, 0, 0).is_err());
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
