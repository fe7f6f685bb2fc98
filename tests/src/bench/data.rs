//! The benchmark data set: synthetic patients with pointers at synthetic organizations,
//! generated from a seed so every run (and the PostgreSQL baseline) sees the same data,
//! and generated on the fly so 20 million pointers never have to sit in memory.

use std::fmt::Write as _;

use pil_client::v1;
use pil_proto::ident;

/// 2025-01-01T00:00:00Z: the data set's clock, so generated times do not depend on when
/// the benchmark runs.
const EPOCH: i64 = 1_735_689_600;
const DAY: i64 = 86_400;

/// Categories an organization of each kind holds (a pointer carries one to three).
const PROFILES: &[&[&str]] = &[
    &[
        "clinical-notes",
        "lab-results",
        "imaging",
        "medications",
        "mental-health",
    ],
    &["nursing", "care-plans", "medications", "vital-signs"],
    &["clinical-notes", "medications", "lab-results", "allergies"],
    &["home-monitoring", "vital-signs", "care-plans"],
];

/// A deterministic data set: `patients` patients with `per_patient` pointers each on
/// average, spread over `orgs` holder organizations.
#[derive(Debug, Clone)]
pub struct DataSet {
    pub seed: u64,
    pub patients: u64,
    pub per_patient: u32,
    pub orgs: Vec<String>,
}

/// SplitMix64: a fast, well-mixed hash of a 64-bit value.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `n` valid organization numbers (mod-11 check digit), the same for every run.
pub fn org_numbers(n: usize) -> Vec<String> {
    const WEIGHTS: [u32; 8] = [3, 2, 7, 6, 5, 4, 3, 2];
    let mut out = Vec::with_capacity(n);
    let mut base: u32 = 91_000_000;
    while out.len() < n {
        base += 7_919;
        let digits: Vec<u32> = format!("{base:08}")
            .bytes()
            .map(|b| (b - b'0') as u32)
            .collect();
        let sum: u32 = digits.iter().zip(WEIGHTS).map(|(d, w)| d * w).sum();
        let check = (11 - sum % 11) % 11;
        if check == 10 {
            continue;
        }
        out.push(format!("{base:08}{check}"));
    }
    out
}

/// Sync generations: 0 is the initial load; every later generation changes every
/// pointer's `last_updated` (so each is an update), and from generation 2 on about one
/// pointer in a hundred is left out (so a replace-mode sync removes it).
pub type Generation = u32;

impl DataSet {
    pub fn new(seed: u64, patients: u64, per_patient: u32, orgs: usize) -> Self {
        assert!(per_patient as usize * 2 <= orgs, "too few organizations");
        assert!(
            orgs.is_power_of_two(),
            "organization count must be a power of two"
        );
        Self {
            seed,
            patients,
            per_patient,
            orgs: org_numbers(orgs),
        }
    }

    /// Total pointers of generation 0.
    pub fn total_pointers(&self) -> u64 {
        (0..self.patients).map(|i| u64::from(self.count(i))).sum()
    }

    fn h(&self, a: u64, b: u64) -> u64 {
        mix(self.seed ^ mix(a ^ mix(b.wrapping_add(0x5151))))
    }

    /// The identifier of patient `i` (one in ten is a D-nummer).
    pub fn patient(&self, i: u64) -> v1::PatientIdentifier {
        let span = ident::SYNTHETIC_UNIQUE_SEEDS - self.patients.min(ident::SYNTHETIC_UNIQUE_SEEDS);
        let s = self.seed % span.max(1) + i;
        if i % 10 == 9 {
            v1::PatientIdentifier {
                system: ident::SYSTEM_DNR.into(),
                value: ident::synthetic_dnr(s),
            }
        } else {
            v1::PatientIdentifier {
                system: ident::SYSTEM_FNR.into(),
                value: ident::synthetic_fnr(s),
            }
        }
    }

    /// Pointers of patient `i`: between `per_patient - 3` and `per_patient + 3`, paired
    /// so that every two patients have exactly `2 × per_patient`.
    pub fn count(&self, i: u64) -> u32 {
        let spread = self.per_patient.saturating_sub(1).min(3);
        let d = (self.h(i & !1, 1) % (u64::from(spread) + 1)) as u32;
        match (i % 2, i + 1 < self.patients) {
            (0, true) => self.per_patient + d,
            (0, false) => self.per_patient,
            _ => self.per_patient - d,
        }
    }

    /// The organizations (indexes) holding patient `i`'s pointers: distinct, from a
    /// random start with a random odd stride.
    fn holders(&self, i: u64) -> impl Iterator<Item = usize> + '_ {
        let n = self.orgs.len();
        let h = self.h(i, 2);
        let start = (h % n as u64) as usize;
        let stride = (((h >> 32) % (n as u64 / 2)) * 2 + 1) as usize;
        (0..self.count(i) as usize).map(move |k| (start + k * stride) % n)
    }

    /// Whether the pointer of patient `i` at organization `org` is in `generation`.
    fn kept(&self, i: u64, org: usize, generation: Generation) -> bool {
        generation < 2
            || !self
                .h(i, 1000 + org as u64 * 64 + u64::from(generation))
                .is_multiple_of(100)
    }

    /// Patient `i`'s pointer at organization index `org`, if it has one.
    pub fn pointer_at(&self, i: u64, org: usize, generation: Generation) -> Option<v1::Pointer> {
        if !self.holders(i).any(|o| o == org) || !self.kept(i, org, generation) {
            return None;
        }
        Some(self.make(i, org, generation))
    }

    /// Every pointer of patient `i` in `generation`.
    pub fn pointers_of(&self, i: u64, generation: Generation) -> Vec<(usize, v1::Pointer)> {
        self.holders(i)
            .filter(|&o| self.kept(i, o, generation))
            .map(|o| (o, self.make(i, o, generation)))
            .collect()
    }

    fn make(&self, i: u64, org: usize, generation: Generation) -> v1::Pointer {
        let h = self.h(i, 3 + org as u64);
        let number = &self.orgs[org];
        let profile = PROFILES[org % PROFILES.len()];
        let k = 1 + (h % 3) as usize;
        let first = ((h >> 8) % profile.len() as u64) as usize;
        let mut categories: Vec<String> = (0..k)
            .map(|j| profile[(first + j) % profile.len()].to_string())
            .collect();
        categories.sort();
        categories.dedup();
        let start = EPOCH - (30 + ((h >> 16) % 3620) as i64) * DAY;
        let updated = EPOCH - ((h >> 28) % 30) as i64 * DAY + i64::from(generation);
        v1::Pointer {
            patient: Some(self.patient(i)),
            holder: Some(v1::Organization {
                organization_number: number.clone(),
                sub_unit_organization_number: String::new(),
                name: format!("Organization {org}"),
            }),
            endpoint: Some(v1::Endpoint {
                base_url: format!("https://fhir.org{number}.example/r4"),
                api_kind: v1::ApiKind::FhirR4 as i32,
            }),
            categories,
            period: Some(v1::Period {
                start: Some(prost_types::Timestamp {
                    seconds: start,
                    nanos: 0,
                }),
                end: None,
            }),
            last_updated: Some(prost_types::Timestamp {
                seconds: updated,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    /// One organization's pointers of `generation`, for patients `from..to`, in batches.
    pub fn org_batches(
        &self,
        org: usize,
        generation: Generation,
        patients: std::ops::Range<u64>,
        batch: usize,
    ) -> impl Iterator<Item = Vec<v1::Pointer>> + '_ {
        let mut next = patients.start;
        let end = patients.end;
        std::iter::from_fn(move || {
            let mut out = Vec::with_capacity(batch);
            while next < end && out.len() < batch {
                if let Some(p) = self.pointer_at(next, org, generation) {
                    out.push(p);
                }
                next += 1;
            }
            (!out.is_empty()).then_some(out)
        })
    }

    /// Patient `i`'s pointers as CSV rows for PostgreSQL's `COPY … (FORMAT csv)`:
    /// system, value, holder, holder name, sub-unit, base URL, API kind, categories
    /// (array literal), period start, last updated.
    pub fn csv_rows(&self, i: u64, out: &mut String) {
        for (_, p) in self.pointers_of(i, 0) {
            let patient = p.patient.as_ref().expect("patient");
            let holder = p.holder.as_ref().expect("holder");
            let endpoint = p.endpoint.as_ref().expect("endpoint");
            let start = p
                .period
                .as_ref()
                .and_then(|x| x.start.as_ref())
                .map(|t| t.seconds)
                .unwrap_or(EPOCH);
            let updated = p.last_updated.as_ref().map(|t| t.seconds).unwrap_or(EPOCH);
            let _ = writeln!(
                out,
                "{},{},{},{},\"\",{},{},\"{{{}}}\",{},{}",
                patient.system,
                patient.value,
                holder.organization_number,
                holder.name,
                endpoint.base_url,
                endpoint.api_kind,
                p.categories.join(","),
                rfc3339(start),
                rfc3339(updated)
            );
        }
    }
}

fn rfc3339(seconds: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn org_numbers_are_valid_and_distinct() {
        let orgs = org_numbers(64);
        for o in &orgs {
            ident::OrgNumber::parse(o).unwrap();
        }
        let mut sorted = orgs.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), orgs.len());
    }

    #[test]
    fn counts_average_exactly() {
        for patients in [1u64, 2, 7, 1000] {
            let d = DataSet::new(7, patients, 5, 16);
            let total = d.total_pointers();
            assert!(total.abs_diff(5 * patients) <= 5, "{patients}: {total}");
        }
        assert_eq!(DataSet::new(7, 1000, 5, 16).total_pointers(), 5000);
    }

    #[test]
    fn per_org_streams_cover_every_pointer_once() {
        let d = DataSet::new(3, 500, 5, 16);
        for generation in [0, 2] {
            let by_patient: usize = (0..500).map(|i| d.pointers_of(i, generation).len()).sum();
            let by_org: usize = (0..16)
                .flat_map(|o| d.org_batches(o, generation, 0..500, 97))
                .map(|b| b.len())
                .sum();
            assert_eq!(by_patient, by_org);
        }
        let dropped = d.total_pointers() as usize
            - (0..500).map(|i| d.pointers_of(i, 2).len()).sum::<usize>();
        assert!(dropped > 0 && dropped < 100, "{dropped}");
    }

    #[test]
    fn pointers_are_valid() {
        let d = DataSet::new(11, 200, 5, 16);
        for i in 0..200 {
            for (_, p) in d.pointers_of(i, 0) {
                pil_node::pointer::NewPointer::from_wire(&p, true).unwrap();
            }
        }
    }
}
