//! The patient report's words, in Norwegian bokmål (the default: the patient's own
//! language) and English.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Nb,
    En,
}

impl Lang {
    pub fn parse(s: &str) -> Self {
        if s == "en" { Lang::En } else { Lang::Nb }
    }

    pub fn code(self) -> &'static str {
        match self {
            Lang::Nb => "nb",
            Lang::En => "en",
        }
    }
}

/// Every fixed text of the report.
pub struct Words {
    pub title: &'static str,
    pub intro: &'static str,
    pub made: &'static str,
    pub time: &'static str,
    pub organization: &'static str,
    pub professional: &'static str,
    pub profession: &'static str,
    pub purpose: &'static str,
    pub decision: &'static str,
    pub regions: &'static str,
    pub emergency: &'static str,
    pub yes: &'static str,
    pub no_lookups: &'static str,
    pub not_answered: &'static str,
    pub verified: &'static str,
    pub not_verified: &'static str,
    pub not_checked: &'static str,
    pub proof_note: &'static str,
    pub all_proven: &'static str,
    pub not_all_proven: &'static str,
    pub other_language: &'static str,
    pub print: &'static str,
}

const NB: Words = Words {
    title: "Hvem har slått meg opp?",
    intro: "Oppslag på pasienten i pasientinformasjonslokalisatoren (PIL), fra alle regioner som svarte. Hver region rapporterer fra sin egen logg.",
    made: "Laget",
    time: "Tidspunkt (norsk tid)",
    organization: "Virksomhet",
    professional: "Helsepersonell",
    profession: "Autorisasjon",
    purpose: "Formål",
    decision: "Utfall",
    regions: "Regioner (bevis)",
    emergency: "Nødrett",
    yes: "ja",
    no_lookups: "Ingen oppslag på pasienten.",
    not_answered: "Svarte ikke",
    verified: "bekreftet",
    not_verified: "IKKE bekreftet",
    not_checked: "ikke kontrollert",
    proof_note: "«Bekreftet» betyr at oppføringen er bevist å stå i regionens signerte, manipuleringssikre logg, kontrollert med regionens offentlige nøkkel.",
    all_proven: "Alle oppføringene er bekreftet.",
    not_all_proven: "Ikke alle oppføringene er bekreftet; se kolonnen «Regioner».",
    other_language: "In English",
    print: "Skriv ut",
};

const EN: Words = Words {
    title: "Who has looked me up?",
    intro: "Lookups of the patient in the patient information locator (PIL), from every region that answered. Each region reports from its own log.",
    made: "Made",
    time: "Time (Norwegian time)",
    organization: "Organization",
    professional: "Health professional",
    profession: "Authorization",
    purpose: "Purpose",
    decision: "Outcome",
    regions: "Regions (proof)",
    emergency: "Emergency access",
    yes: "yes",
    no_lookups: "No lookups of the patient.",
    not_answered: "Did not answer",
    verified: "verified",
    not_verified: "NOT verified",
    not_checked: "not checked",
    proof_note: "“Verified” means the record is proven to be in the region's signed, tamper-evident log, checked with the region's public key.",
    all_proven: "Every record is verified.",
    not_all_proven: "Not every record is verified; see the Regions column.",
    other_language: "På norsk",
    print: "Print",
};

pub fn words(lang: Lang) -> &'static Words {
    match lang {
        Lang::Nb => &NB,
        Lang::En => &EN,
    }
}

/// HL7 PurposeOfUse codes in words; other codes as they are.
pub fn purpose(code: &str, lang: Lang) -> String {
    let (nb, en) = match code {
        "TREAT" => ("Behandling", "Treatment"),
        "ETREAT" => ("Akutt behandling (nødrett)", "Emergency treatment"),
        "COC" => ("Koordinering av helsehjelp", "Coordination of care"),
        "PATRQT" => ("Pasientens eget ønske", "Patient's request"),
        "POPHLTH" => ("Folkehelse", "Population health"),
        "HOPERAT" => ("Drift av helsetjenesten", "Healthcare operations"),
        "HRESCH" => ("Helseforskning", "Health research"),
        _ => return code.to_string(),
    };
    match lang {
        Lang::Nb => nb.to_string(),
        Lang::En => en.to_string(),
    }
}

/// A record's time as a Norwegian reads a clock: `03.12.2026 19:54:19`, Norwegian
/// time; the record's own text when it cannot be read.
pub fn local_time(rfc3339: &str) -> String {
    super::flags::norwegian_time(rfc3339)
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[day].[month].[year] [hour]:[minute]:[second]"
            ))
            .ok()
        })
        .unwrap_or_else(|| rfc3339.to_string())
}

/// A decision in words.
pub fn decision(outcome: &str, lang: Lang) -> String {
    let (nb, en) = match outcome {
        "allowed" => ("Tillatt", "Allowed"),
        "denied" => ("Avvist", "Refused"),
        "unauthenticated" => ("Ikke autentisert", "Not authenticated"),
        _ => return outcome.to_string(),
    };
    match lang {
        Lang::Nb => nb.to_string(),
        Lang::En => en.to_string(),
    }
}

/// HPR authorization codes (kodeverk 9060) most often seen; others as they are.
pub fn profession(code: &str, lang: Lang) -> String {
    let (nb, en) = match code {
        "LE" => ("Lege", "Physician"),
        "SP" => ("Sykepleier", "Nurse"),
        "PS" => ("Psykolog", "Psychologist"),
        "TL" => ("Tannlege", "Dentist"),
        "JO" => ("Jordmor", "Midwife"),
        "FT" => ("Fysioterapeut", "Physiotherapist"),
        "HF" => ("Helsefagarbeider", "Health worker"),
        "FA1" | "FA2" => ("Farmasøyt", "Pharmacist"),
        _ => return code.to_string(),
    };
    match lang {
        Lang::Nb => nb.to_string(),
        Lang::En => en.to_string(),
    }
}
