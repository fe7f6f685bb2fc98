//! Property tests of the identifier rules in `pil_proto::ident`.
//!
//! Valid numbers are built here with an independent implementation of the mod-11 rules,
//! so the tests do not just check the module against itself.

use pil_proto::ident::{
    HprNumber, IdentError, OrgNumber, PatientId, PatientIdKind, SYSTEM_DNR, SYSTEM_FHN, SYSTEM_FNR,
    SYSTEM_HPR, SYSTEM_ORGNR, synthetic_dnr, synthetic_fnr,
};
use proptest::prelude::*;

const PATIENT_SYSTEMS: [&str; 3] = [SYSTEM_FNR, SYSTEM_DNR, SYSTEM_FHN];

fn to_string(digits: &[u8]) -> String {
    digits.iter().map(|&d| char::from(b'0' + d)).collect()
}

/// Appends check digits to nine digits so that the weighted k1 sum has remainder `rest`
/// (0 = classic rule, 1-3 = valid only under Skatteetaten's 2032 rule) and the k2 sum
/// remainder 0. `None` when k1 or k2 would have to be 10.
fn with_check_digits(first9: &[u8], rest: u32) -> Option<Vec<u8>> {
    const K1: [u32; 9] = [3, 7, 6, 1, 8, 9, 4, 5, 2];
    const K2: [u32; 10] = [5, 4, 3, 2, 7, 6, 5, 4, 3, 2];
    let sum =
        |d: &[u8], w: &[u32]| -> u32 { d.iter().zip(w).map(|(&d, &w)| u32::from(d) * w).sum() };
    let mut d = first9.to_vec();
    let k1 = (rest + 11 - sum(&d, &K1) % 11) % 11;
    if k1 == 10 {
        return None;
    }
    d.push(k1 as u8);
    let k2 = (11 - sum(&d, &K2) % 11) % 11;
    if k2 == 10 {
        return None;
    }
    d.push(k2 as u8);
    Some(d)
}

fn two(n: u8) -> [u8; 2] {
    [n / 10, n % 10]
}

/// A valid patient identifier: its digits, the system it belongs under, and its kind.
fn valid_patient_id() -> impl Strategy<Value = (Vec<u8>, &'static str, PatientIdKind)> {
    (
        0..4u8,   // 0 fnr, 1 D-nummer, 2 H-nummer, 3 FH-nummer
        1..=28u8, // day (28 keeps every month and year valid)
        1..=12u8, // month
        0..100u8, // two-digit year
        prop::array::uniform3(0..10u8),
        0..4u32, // remainder of the k1 sum
        0..3u8,  // synthetic offset: none, +80, +65
        8..10u8, // first digit of an FH-nummer
        prop::array::uniform8(0..10u8),
    )
        .prop_filter_map(
            "k1 or k2 would be 10",
            |(kind, day, month, yy, individual, rest, synth, fh_first, fh_rest)| {
                let offset = [0, 80, 65][usize::from(synth)];
                let (first9, system, kind) = match kind {
                    0 | 1 => {
                        let (day, system, kind) = if kind == 0 {
                            (day, SYSTEM_FNR, PatientIdKind::Fodselsnummer)
                        } else {
                            (day + 40, SYSTEM_DNR, PatientIdKind::DNummer)
                        };
                        let mut d = Vec::with_capacity(11);
                        d.extend(two(day));
                        d.extend(two(month + offset));
                        d.extend(two(yy));
                        d.extend(individual);
                        (d, system, kind)
                    }
                    2 => {
                        let mut d = Vec::with_capacity(11);
                        d.extend(two(day));
                        d.extend(two(month + 40));
                        d.extend(two(yy));
                        d.extend(individual);
                        (d, SYSTEM_FNR, PatientIdKind::HNummer)
                    }
                    _ => {
                        let mut d = vec![fh_first];
                        d.extend(fh_rest);
                        (d, SYSTEM_FHN, PatientIdKind::FellesHjelpenummer)
                    }
                };
                // The 2032 rule is for fødselsnummer and D-nummer only.
                let rest = match kind {
                    PatientIdKind::Fodselsnummer | PatientIdKind::DNummer => rest,
                    _ => 0,
                };
                with_check_digits(&first9, rest).map(|d| (d, system, kind))
            },
        )
}

/// A valid organization number.
fn valid_org_number() -> impl Strategy<Value = Vec<u8>> {
    prop::array::uniform8(0..10u8).prop_filter_map("check digit would be 10", |first8| {
        const W: [u32; 8] = [3, 2, 7, 6, 5, 4, 3, 2];
        let sum: u32 = first8.iter().zip(W).map(|(&d, w)| u32::from(d) * w).sum();
        let check = (11 - sum % 11) % 11;
        (check < 10).then(|| {
            let mut d = first8.to_vec();
            d.push(check as u8);
            d
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn synthetic_fnr_is_accepted_only_with_the_flag(seed in any::<u64>()) {
        let n = synthetic_fnr(seed);
        let id = PatientId::parse(SYSTEM_FNR, &n, true).unwrap();
        prop_assert_eq!(id.kind(), PatientIdKind::Fodselsnummer);
        prop_assert!(id.is_synthetic());
        let refused = matches!(
            PatientId::parse(SYSTEM_FNR, &n, false),
            Err(IdentError::SyntheticNotAllowed { offset: 80, .. })
        );
        prop_assert!(refused);
    }

    #[test]
    fn synthetic_dnr_is_accepted_only_with_the_flag(seed in any::<u64>()) {
        let n = synthetic_dnr(seed);
        let id = PatientId::parse(SYSTEM_DNR, &n, true).unwrap();
        prop_assert_eq!(id.kind(), PatientIdKind::DNummer);
        prop_assert!(id.is_synthetic());
        let refused = matches!(
            PatientId::parse(SYSTEM_DNR, &n, false),
            Err(IdentError::SyntheticNotAllowed { offset: 80, .. })
        );
        prop_assert!(refused);
    }

    #[test]
    fn distinct_seeds_give_distinct_numbers(a in 0..10_000_000u64, b in 0..10_000_000u64) {
        prop_assume!(a != b);
        prop_assert_ne!(synthetic_fnr(a), synthetic_fnr(b));
        prop_assert_ne!(synthetic_dnr(a), synthetic_dnr(b));
    }

    #[test]
    fn valid_numbers_parse_under_their_own_system((digits, system, kind) in valid_patient_id()) {
        let n = to_string(&digits);
        let id = PatientId::parse(system, &n, true).unwrap();
        prop_assert_eq!(id.kind(), kind);
        prop_assert_eq!(id.system(), system);
        prop_assert_eq!(id.value(), n.as_str());
        for other in PATIENT_SYSTEMS.iter().filter(|&&s| s != system) {
            let mismatch = matches!(
                PatientId::parse(other, &n, true),
                Err(IdentError::KindMismatch { .. })
            );
            prop_assert!(mismatch);
        }
    }

    /// What is actually true: the k2 sum weighs all eleven digits with weights that are
    /// non-zero mod 11 (5,4,3,2,7,6,5,4,3,2,1), and 11 is prime, so changing one digit
    /// always breaks it. Both the classic and the 2032 rule keep that check, so no single
    /// substitution ever yields another valid number, under any system.
    #[test]
    fn a_single_changed_digit_is_always_refused(
        (digits, _system, _kind) in valid_patient_id(),
        pos in 0..11usize,
        delta in 1..10u8,
    ) {
        let mut changed = digits.clone();
        changed[pos] = (changed[pos] + delta) % 10;
        let n = to_string(&changed);
        for system in PATIENT_SYSTEMS {
            prop_assert!(PatientId::parse(system, &n, true).is_err());
        }
    }

    #[test]
    fn arbitrary_input_never_panics(
        system in prop_oneof![
            Just(SYSTEM_FNR.to_owned()),
            Just(SYSTEM_DNR.to_owned()),
            Just(SYSTEM_FHN.to_owned()),
            Just(SYSTEM_HPR.to_owned()),
            Just(SYSTEM_ORGNR.to_owned()),
            any::<String>(),
        ],
        value in prop_oneof![any::<String>(), "[0-9]{0,13}", "[0-9٠-٩a ]{9,12}"],
        allow in any::<bool>(),
    ) {
        let _ = PatientId::parse(&system, &value, allow);
        let _ = OrgNumber::parse(&value);
        let _ = HprNumber::parse(&value);
    }

    /// Errors and `Debug` never carry the value (it is personal data).
    #[test]
    fn errors_never_contain_the_value(
        value in "[0-9]{11}",
        system in prop::sample::select(PATIENT_SYSTEMS.to_vec()),
        allow in any::<bool>(),
    ) {
        match PatientId::parse(system, &value, allow) {
            Err(e) => {
                let debug = format!("{e:?}");
                prop_assert!(!e.to_string().contains(&value));
                prop_assert!(!debug.contains(&value));
            }
            Ok(id) => {
                let debug = format!("{id:?}");
                prop_assert!(!debug.contains(&value));
            }
        }
    }

    #[test]
    fn valid_org_numbers_parse_and_round_trip(digits in valid_org_number()) {
        let n = to_string(&digits);
        let org: OrgNumber = n.parse().unwrap();
        prop_assert_eq!(org.as_str(), n.as_str());
        prop_assert_eq!(org.to_string(), n);
    }

    #[test]
    fn org_numbers_with_a_changed_digit_are_refused(
        digits in valid_org_number(),
        pos in 0..9usize,
        delta in 1..10u8,
    ) {
        let mut changed = digits.clone();
        changed[pos] = (changed[pos] + delta) % 10;
        let refused = matches!(
            OrgNumber::parse(&to_string(&changed)),
            Err(IdentError::CheckDigit { what: "organization number" })
        );
        prop_assert!(refused);
    }

    #[test]
    fn hpr_numbers_are_one_to_nine_digits(n in "[0-9]{1,9}", long in "[0-9]{10,14}") {
        let hpr = HprNumber::parse(&n).unwrap();
        prop_assert_eq!(hpr.as_str(), n.as_str());
        prop_assert!(HprNumber::parse(&long).is_err());
    }
}
