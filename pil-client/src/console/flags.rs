//! Patterns in the lookups that a privacy officer should look at. A flag is a reason
//! to ask, never a finding: each has innocent explanations (docs/auditor-guide.md,
//! "Flags", says which).

use std::collections::{BTreeMap, BTreeSet};

use time::{
    Date, Month, OffsetDateTime, UtcOffset, Weekday, format_description::well_known::Rfc3339,
};

use crate::audit_record::Record;

/// When a pattern becomes a flag.
#[derive(Debug, Clone)]
pub struct Thresholds {
    /// Distinct patients one professional looked up that their organization holds
    /// nothing for.
    pub patients_outside_holdings: usize,
    /// Refused lookups of one requester.
    pub refusals: usize,
    /// Night, Norwegian time: from this hour…
    pub night_from: u8,
    /// …until this hour.
    pub night_until: u8,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            patients_outside_holdings: 10,
            refusals: 3,
            night_from: 23,
            night_until: 6,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FlagKind {
    /// One professional looked up many patients their organization holds nothing for.
    ManyPatientsOutsideHoldings,
    /// One requester was refused repeatedly.
    RepeatedRefusals,
    /// Allowed lookups at night.
    Night,
    /// An organization looked up patients it holds nothing for.
    HoldsNothing,
}

impl FlagKind {
    pub fn title(self) -> &'static str {
        match self {
            FlagKind::ManyPatientsOutsideHoldings => {
                "Many patients outside the organization's holdings"
            }
            FlagKind::RepeatedRefusals => "Repeated refusals",
            FlagKind::Night => "Access at night",
            FlagKind::HoldsNothing => "Patients the organization holds nothing for",
        }
    }

    pub fn id(self) -> &'static str {
        match self {
            FlagKind::ManyPatientsOutsideHoldings => "outside-holdings",
            FlagKind::RepeatedRefusals => "repeated-refusals",
            FlagKind::Night => "night",
            FlagKind::HoldsNothing => "holds-nothing",
        }
    }
}

/// One flag: who, how often, and the records behind it (newest first, at most
/// [`EXAMPLES`]).
#[derive(Debug, Clone)]
pub struct Flag {
    pub kind: FlagKind,
    pub who: String,
    pub count: usize,
    pub what: String,
    pub records: Vec<u64>,
}

/// Records a flag lists.
pub const EXAMPLES: usize = 10;

/// The Norwegian wall-clock time of a record's RFC 3339 time: CET, and CEST from the
/// last Sunday of March to the last Sunday of October (01:00 UTC both).
pub fn norwegian_time(rfc3339: &str) -> Option<OffsetDateTime> {
    let utc = OffsetDateTime::parse(rfc3339, &Rfc3339)
        .ok()?
        .to_offset(UtcOffset::UTC);
    let year = utc.year();
    let start = last_sunday(year, Month::March)?
        .with_hms(1, 0, 0)
        .ok()?
        .assume_utc();
    let end = last_sunday(year, Month::October)?
        .with_hms(1, 0, 0)
        .ok()?
        .assume_utc();
    let hours = if utc >= start && utc < end { 2 } else { 1 };
    Some(utc.to_offset(UtcOffset::from_hms(hours, 0, 0).ok()?))
}

fn last_sunday(year: i32, month: Month) -> Option<Date> {
    let mut d =
        Date::from_calendar_date(year, month, time::util::days_in_month(month, year)).ok()?;
    while d.weekday() != Weekday::Sunday {
        d = d.previous_day()?;
    }
    Some(d)
}

fn requester_key(r: &Record) -> String {
    let who = r.professional_named();
    if who.is_empty() {
        r.organization_named()
    } else {
        who
    }
}

struct Tally {
    count: usize,
    patients: BTreeSet<String>,
    records: Vec<u64>,
}

impl Tally {
    fn add(&mut self, r: &Record) {
        self.count += 1;
        if let Some(p) = &r.patient {
            self.patients.insert(p.clone());
        }
        self.records.push(r.index);
    }
}

fn tally<'a>(
    records: impl Iterator<Item = &'a Record>,
    key: impl Fn(&Record) -> String,
) -> BTreeMap<String, Tally> {
    let mut out: BTreeMap<String, Tally> = BTreeMap::new();
    for r in records {
        out.entry(key(r))
            .or_insert_with(|| Tally {
                count: 0,
                patients: BTreeSet::new(),
                records: Vec::new(),
            })
            .add(r);
    }
    out
}

fn examples(mut records: Vec<u64>) -> Vec<u64> {
    records.sort_unstable_by(|a, b| b.cmp(a));
    records.truncate(EXAMPLES);
    records
}

/// The flags the lookups raise, most serious kind first, larger counts first.
pub fn flags(records: &[Record], t: &Thresholds) -> Vec<Flag> {
    let lookups = || records.iter().filter(|r| r.is_lookup());
    let allowed = || lookups().filter(|r| r.decision.outcome == "allowed");
    let outside = || allowed().filter(|r| r.requester.is_some() && !r.own_organization_holds());
    let mut out = Vec::new();

    for (who, tally) in tally(outside().filter(|r| r.hpr() != ""), requester_key) {
        if tally.patients.len() >= t.patients_outside_holdings {
            out.push(Flag {
                kind: FlagKind::ManyPatientsOutsideHoldings,
                who,
                count: tally.patients.len(),
                what: format!(
                    "{} patients looked up that the organization holds nothing for",
                    tally.patients.len()
                ),
                records: examples(tally.records),
            });
        }
    }
    for (who, tally) in tally(
        lookups().filter(|r| r.decision.outcome == "denied"),
        requester_key,
    ) {
        if tally.count >= t.refusals {
            out.push(Flag {
                kind: FlagKind::RepeatedRefusals,
                who,
                count: tally.count,
                what: format!("{} lookups refused", tally.count),
                records: examples(tally.records),
            });
        }
    }
    let night_from = t.night_from;
    let night_until = t.night_until;
    let is_night = |r: &&Record| {
        norwegian_time(&r.time).is_some_and(|time| {
            let h = time.hour();
            if night_from > night_until {
                h >= night_from || h < night_until
            } else {
                h >= night_from && h < night_until
            }
        })
    };
    for (who, tally) in tally(allowed().filter(is_night), requester_key) {
        out.push(Flag {
            kind: FlagKind::Night,
            who,
            count: tally.count,
            what: format!(
                "{} lookups between {night_from:02}:00 and {night_until:02}:00",
                tally.count
            ),
            records: examples(tally.records),
        });
    }
    for (who, tally) in tally(outside(), |r| r.organization_named()) {
        out.push(Flag {
            kind: FlagKind::HoldsNothing,
            who,
            count: tally.patients.len(),
            what: format!(
                "{} patients looked up that it holds nothing for ({} lookups)",
                tally.patients.len(),
                tally.count
            ),
            records: examples(tally.records),
        });
    }
    out.sort_by(|a, b| a.kind.cmp(&b.kind).then(b.count.cmp(&a.count)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(
        index: u64,
        time: &str,
        hpr: &str,
        patient: &str,
        decision: &str,
        holds: bool,
    ) -> Record {
        let orgs = if holds { r#"["983974724"]"# } else { "[]" };
        Record::parse(
            format!(
                r#"{{"index":{index},"time":"{time}","action":"lookup","patient":"{patient}",
                "requester":{{"organization":"983974724","hpr_number":"{hpr}",
                "purpose_of_use":{{"system":"s","code":"TREAT"}}}},
                "decision":{{"outcome":"{decision}"}},"outcome":{{"status":"OK","organizations":{orgs}}}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn norwegian_time_follows_summer_time() {
        assert_eq!(norwegian_time("2026-01-15T22:30:00Z").unwrap().hour(), 23);
        assert_eq!(norwegian_time("2026-07-15T22:30:00Z").unwrap().hour(), 0);
        // Summer time starts 2026-03-29 01:00 UTC and ends 2026-10-25 01:00 UTC.
        assert_eq!(norwegian_time("2026-03-29T00:59:00Z").unwrap().hour(), 1);
        assert_eq!(norwegian_time("2026-03-29T01:00:00Z").unwrap().hour(), 3);
        assert_eq!(norwegian_time("2026-10-25T00:59:00Z").unwrap().hour(), 2);
        assert_eq!(norwegian_time("2026-10-25T01:00:00Z").unwrap().hour(), 2);
        assert!(norwegian_time("yesterday").is_none());
    }

    #[test]
    fn each_pattern_raises_its_flag_and_nothing_else_does() {
        let t = Thresholds {
            patients_outside_holdings: 3,
            ..Thresholds::default()
        };
        let mut records = Vec::new();
        // A professional looks up three patients their organization holds nothing for.
        for i in 0..3 {
            records.push(lookup(
                i,
                "2026-05-04T10:00:00Z",
                "1111111",
                &format!("p{i}"),
                "allowed",
                false,
            ));
        }
        // Another is refused three times, and looks one patient up at night.
        for i in 3..6 {
            records.push(lookup(
                i,
                "2026-05-04T11:00:00Z",
                "2222222",
                "q",
                "denied",
                true,
            ));
        }
        records.push(lookup(
            6,
            "2026-05-04T23:30:00Z",
            "2222222",
            "q",
            "allowed",
            true,
        ));
        // Ordinary lookups: no flag.
        records.push(lookup(
            7,
            "2026-05-04T12:00:00Z",
            "3333333",
            "r",
            "allowed",
            true,
        ));
        let flags = flags(&records, &t);
        let summary: Vec<(FlagKind, String, usize)> = flags
            .iter()
            .map(|f| (f.kind, f.who.clone(), f.count))
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    FlagKind::ManyPatientsOutsideHoldings,
                    "HPR 1111111".into(),
                    3
                ),
                (FlagKind::RepeatedRefusals, "HPR 2222222".into(), 3),
                (FlagKind::Night, "HPR 2222222".into(), 1),
                (FlagKind::HoldsNothing, "983974724".into(), 3),
            ]
        );
        assert_eq!(flags[0].records, vec![2, 1, 0]);
    }
}
