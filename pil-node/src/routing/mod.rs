//! Privacy-preserving routing: asking only the regions that may hold something about
//! a patient, without handing any region a list of another region's patients.
//!
//! A region summarizes the patients it holds anything for (pointers, blocks,
//! opt-outs) as a filter over *tokens* ([`tokens`]): an oblivious PRF of the
//! identifier under a key only that region holds. A home node learns the token of the
//! patient it looks up by an exchange in which the holding region sees neither the
//! identifier nor the token, and checks that region's [`summary`]: a region whose
//! summary is fresh and cannot hold the patient is not asked; one whose summary is
//! missing or older than the bound always is, so routing never misses a pointer to
//! save a request. A peer holding every summary it was sent cannot test identifiers
//! offline: without the region's key it cannot make tokens.
//!
//! These are the parts routing is built from; lookups do not route through them yet.

pub mod summary;
pub mod tokens;
