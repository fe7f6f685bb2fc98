//! PIL legal configuration: Cedar rules, schema and node settings, and the
//! engine that decides lookups with them. See [`policy`].

pub mod policy;

pub use policy::{
    DEFAULT_FILES, Decision, LegalConfig, NodeSettings, PointerFacts, PolicyError, Problem,
    Requester, Role, RuleEffect, RuleRef, RuleSummary, Summary, check, is_valid_orgnr,
    write_default,
};
