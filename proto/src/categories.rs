//! PIL's data-category vocabulary.
//!
//! Categories are strings on the wire so new ones can be added without breaking
//! clients, but every node validates against this list so a typo cannot register data
//! nobody will ever find. Which categories are *sensitive* is a legal decision and lives
//! in `legal-config/`, not here.

/// Every known category code with a one-line description.
pub const CATEGORIES: &[(&str, &str)] = &[
    (
        "clinical-notes",
        "Journal notes, discharge summaries and referrals",
    ),
    (
        "medications",
        "Prescriptions, medication lists and administration",
    ),
    ("lab-results", "Laboratory and microbiology results"),
    ("imaging", "Radiology images and reports"),
    (
        "allergies",
        "Allergies, intolerances and critical information",
    ),
    (
        "care-plans",
        "Care plans, individual plans and follow-up plans",
    ),
    ("vital-signs", "Vital signs and measurements from care"),
    (
        "home-monitoring",
        "Measurements from digital home follow-up (DHO)",
    ),
    ("nursing", "Nursing and home-care documentation"),
    ("dental", "Dental health records"),
    ("mental-health", "Psychiatric and mental health care"),
    (
        "substance-abuse",
        "Interdisciplinary specialized substance-abuse treatment (TSB)",
    ),
    ("sexual-health", "Sexual and reproductive health"),
    ("genetics", "Genetic testing and counselling"),
];

/// Longest accepted category code, to bound request sizes.
pub const MAX_CATEGORY_LEN: usize = 64;

/// Most categories one pointer may carry.
pub const MAX_CATEGORIES_PER_POINTER: usize = 32;

/// True when `code` is a known category.
pub fn is_known(code: &str) -> bool {
    CATEGORIES.iter().any(|(c, _)| *c == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown() {
        assert!(is_known("mental-health"));
        assert!(!is_known("Mental-Health"));
        assert!(!is_known(""));
    }

    #[test]
    fn codes_are_unique_and_short() {
        let mut codes: Vec<_> = CATEGORIES.iter().map(|(c, _)| *c).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), CATEGORIES.len());
        assert!(codes.iter().all(|c| c.len() <= MAX_CATEGORY_LEN));
    }
}
