//! What a lookup shows, decided apart from the wire: which found pointers the legal
//! configuration lets a requester see, which protections hide them, which rules
//! decided, and how answers from several regions merge. The lookup service and the
//! federation service call these with wire pointers, the registry's own pointers go
//! through them too; no wire type is named here.

use std::collections::HashSet;

use pil_legal::{Decision, LegalConfig, PointerFacts, Requester, RuleRef};

use crate::{access::ShutOut, registry::Pointer};

/// What the lookup needs to know of a pointer, whatever its form.
pub trait Shown {
    /// The holder's organization number.
    fn holder(&self) -> &str;
    fn categories(&self) -> &[String];
    /// The region that holds the pointer.
    fn region(&self) -> &str;
    /// The endpoint's identity: sub-unit, base URL, API kind.
    fn endpoint(&self) -> (&str, &str, i32);
    /// When its holder last changed it, as `(seconds, nanoseconds)` since the epoch.
    fn updated(&self) -> (i64, i32);
}

impl Shown for Pointer {
    fn holder(&self) -> &str {
        std::str::from_utf8(&self.key.org).unwrap_or_default()
    }

    fn categories(&self) -> &[String] {
        &self.value.categories
    }

    fn region(&self) -> &str {
        &self.region
    }

    fn endpoint(&self) -> (&str, &str, i32) {
        (
            &self.value.sub_unit,
            &self.value.base_url,
            self.value.api_kind,
        )
    }

    fn updated(&self) -> (i64, i32) {
        let ns = self.value.last_updated;
        (
            ns.div_euclid(1_000_000_000),
            ns.rem_euclid(1_000_000_000) as i32,
        )
    }
}

/// The pointers a requester may see, and what decided it.
pub struct Visible<P> {
    pub pointers: Vec<P>,
    /// The search decision's rules, then every pointer decision's, each once.
    pub rules: Vec<RuleRef>,
    /// Whether emergency access let anything through.
    pub emergency: bool,
}

/// Decides each found pointer under the legal configuration, after the search itself
/// was allowed by `search`. Pointers of holders the patient's blocks shut out are not
/// even decided.
pub fn decide_each<P: Shown>(
    legal: &LegalConfig,
    requester: &Requester,
    search: &Decision,
    found: Vec<P>,
    shut: &ShutOut,
) -> Visible<P> {
    let mut rules = search.rules.clone();
    let mut emergency = search.emergency;
    let mut pointers = Vec::with_capacity(found.len());
    for p in found {
        if shut.hides(p.holder()) {
            continue;
        }
        let decision = legal.decide(
            requester,
            &PointerFacts {
                holder: p.holder().to_string(),
                categories: p.categories().to_vec(),
                region: p.region().to_string(),
            },
        );
        add_rules(&mut rules, &decision.rules);
        if decision.allowed {
            emergency |= decision.emergency;
            pointers.push(p);
        }
    }
    Visible {
        pointers,
        rules,
        emergency,
    }
}

/// Adds the rules not already in `rules`, by id, keeping their order.
pub fn add_rules<'a>(rules: &mut Vec<RuleRef>, more: impl IntoIterator<Item = &'a RuleRef>) {
    for r in more {
        if !rules.iter().any(|k| k.id == r.id) {
            rules.push(r.clone());
        }
    }
}

/// Applies the protections every region's answer brought: an opt-out anywhere hides
/// everything, a block anywhere hides its holders' pointers from every region.
pub fn protect<P: Shown>(pointers: &mut Vec<P>, opted_out: bool, shut: &ShutOut) {
    if opted_out {
        pointers.clear();
    }
    pointers.retain(|p| !shut.hides(p.holder()));
}

/// Newest first, one pointer per endpoint: the same endpoint registered in two
/// regions shows once, as its newest registration.
pub fn merge<P: Shown>(mut pointers: Vec<P>) -> Vec<P> {
    pointers.sort_by_key(|p| std::cmp::Reverse(p.updated()));
    let mut seen = HashSet::new();
    pointers.retain(|p| {
        let (sub_unit, base_url, api_kind) = p.endpoint();
        seen.insert((
            p.holder().to_string(),
            sub_unit.to_string(),
            base_url.to_string(),
            api_kind,
        ))
    });
    pointers
}

/// The holder organizations of an answer, sorted, each once (as audit records name
/// them).
pub fn holders<P: Shown>(pointers: &[P]) -> Vec<String> {
    let mut orgs: Vec<String> = pointers.iter().map(|p| p.holder().to_string()).collect();
    orgs.sort();
    orgs.dedup();
    orgs
}
