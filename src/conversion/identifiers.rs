//! Identifier normalization and hashing, exactly as X specifies them.
//!
//! Invariants: a value that is already a SHA-256 hex digest is passed through lower-cased and never
//! hashed again; every function returns either a non-empty value or an error, never an empty string;
//! raw email addresses and phone numbers never appear in an error message.

use phonenumber::metadata::Metadata;
use sha2::{Digest, Sha256};
use unicode_general_category::{get_general_category, GeneralCategory};
use url::Url;

/// SHA-256 of `input`, lower-case hex, no salt.
pub fn sha256_hex(input: &str) -> String {
    hex_lower(&Sha256::digest(input.as_bytes()))
}

/// Lower-case hex, by table (this runs several times per event).
pub fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// `Some(lower-cased digest)` when `input` (trimmed) is a 64-character hex string.
pub fn as_sha256_digest(input: &str) -> Option<String> {
    let t = input.trim();
    (t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit())).then(|| t.to_ascii_lowercase())
}

/// The longest address a mail server takes (RFC 5321: 256 for the path, brackets included).
const MAX_EMAIL_BYTES: usize = 254;

/// Email as X wants it before hashing: format characters (Unicode Cf) removed, trimmed, lower-cased, and
/// plausibly an address (one `@`, a dotted domain, at most 254 bytes).
pub fn normalize_email(input: &str) -> Result<String, &'static str> {
    // Invisible format characters (zero-width spaces, a BOM pasted with the address) would make a hash
    // that matches nothing: they go first, then the address is trimmed and lower-cased.
    let visible: String = input
        .chars()
        .filter(|c| get_general_category(*c) != GeneralCategory::Format)
        .collect();
    let email = visible.trim().to_lowercase();
    if email.is_empty() {
        return Err("is empty; send the address or leave the field out");
    }
    if email.len() > MAX_EMAIL_BYTES {
        return Err("is not an email address: longer than 254 characters (RFC 5321)");
    }
    if email.matches('@').count() != 1 {
        return Err("is not an email address: expected exactly one '@', as in name@domain");
    }
    let Some((local, domain)) = email.rsplit_once('@') else {
        return Err("is not an email address: expected name@domain");
    };
    if local.is_empty() || domain.is_empty() {
        return Err("is not an email address: expected name@domain");
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("is not an email address: it contains whitespace");
    }
    if domain.contains('@')
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
    {
        return Err("is not an email address: the domain after '@' must look like example.com");
    }
    Ok(email)
}

/// `hashed_email` for a raw address or an existing digest.
pub fn hashed_email(raw: &str) -> Result<String, &'static str> {
    match as_sha256_digest(raw) {
        Some(d) => Ok(d),
        None => normalize_email(raw).map(|e| sha256_hex(&e)),
    }
}

/// Validates a pre-hashed value (the `hashed_*` input fields).
pub fn prehashed(raw: &str) -> Result<String, &'static str> {
    as_sha256_digest(raw).ok_or("must be a SHA-256 hex digest (64 characters 0-9, a-f)")
}

/// Phone number in E.164 with the leading `+`. National formats use `default_region`.
///
/// Accepts every *possible* number (its national number has a length the numbering plan allows), not only
/// numbers in current allocation metadata, which lags new ranges (X's own example `+11234567890` is possible,
/// not valid).
pub fn normalize_phone(
    input: &str,
    default_region: phonenumber::country::Id,
) -> Result<String, &'static str> {
    let trimmed = input.trim();
    if let Some(e164) = nanp_fast_path(trimmed, default_region) {
        return Ok(e164);
    }
    normalize_phone_parsed(trimmed, default_region)
}

/// The common shapes of a North American number (`+1 (650) 253-0000`, `650-253-0000`, `1 650 253 0000`:
/// digits with spaces, `-`, `.` and one pair of parentheses) without the parser, which costs as much as the
/// rest of an event's mapping. `None` for every other input, which the parser takes. It gives exactly what
/// the parser path gives (a differential property test over random digits, formats and regions holds it to
/// that): ten digits whose first is 2-9 are a possible number in every NANP region, and it declines where a
/// region's national-prefix rules could change the digits (a `national_prefix_for_parsing`, or an
/// international number that starts with the default region's national prefix).
fn nanp_fast_path(trimmed: &str, default_region: phonenumber::country::Id) -> Option<String> {
    let bytes = trimmed.as_bytes();
    let (plus, rest) = match bytes.split_first()? {
        (b'+', rest) => (true, rest),
        _ => (false, bytes),
    };
    // The parser reads the digits after `+` up to the first separator as the country code when they are
    // fewer than four (`+12-000...` is country 12, unknown), so only `+1` set apart, or all eleven digits
    // written together, are this path's.
    if plus {
        let together = rest.len() == 11 && rest.iter().all(u8::is_ascii_digit);
        let set_apart =
            rest.first() == Some(&b'1') && matches!(rest.get(1), Some(b' ' | b'-' | b'.' | b'('));
        if !(together || set_apart) {
            return None;
        }
    }
    let mut digits = [0u8; 11];
    let mut n = 0;
    let mut parens = 0; // 0: none yet, 1: open, 2: closed
    for &b in rest {
        match b {
            b'0'..=b'9' => {
                *digits.get_mut(n)? = b;
                n += 1;
            }
            b' ' | b'-' | b'.' => {}
            b'(' if parens == 0 => parens = 1,
            b')' if parens == 1 => parens = 2,
            _ => return None,
        }
    }
    if parens == 1 {
        return None;
    }
    let national = match (plus, n, digits[0]) {
        (true, 11, b'1') | (false, 11, b'1') => digits.get(1..11)?,
        (false, 10, _) => digits.get(..10)?,
        _ => return None,
    };
    if !national.first().is_some_and(|d| (b'2'..=b'9').contains(d)) {
        return None;
    }
    let meta = phonenumber::metadata::DATABASE.by_id(default_region.as_ref())?;
    if meta.national_prefix_for_parsing().is_some() || (!plus && meta.country_code() != 1) {
        return None;
    }
    if plus
        && meta
            .national_prefix()
            .is_some_and(|p| national.starts_with(p.as_bytes()))
    {
        return None;
    }
    let mut out = String::with_capacity(12);
    out.push_str("+1");
    out.push_str(std::str::from_utf8(national).ok()?);
    Some(out)
}

/// `normalize_phone` through the parser (`trimmed`: the input without surrounding whitespace).
fn normalize_phone_parsed(
    trimmed: &str,
    default_region: phonenumber::country::Id,
) -> Result<String, &'static str> {
    if trimmed.is_empty() {
        return Err("is empty; send the number or leave the field out");
    }
    if !trimmed.chars().any(|c| c.is_ascii_digit()) {
        return Err("is not a phone number: it has no digits");
    }
    let number = phonenumber::parse(Some(default_region), trimmed)
        .map_err(|_| "is not a phone number: use E.164 (+15551234567) or a national format of the account's default_phone_region")?;
    let code = number.code().value();
    let parsed = number.national().to_string();
    // The crate strips a national prefix even where libphonenumber would not (it keeps the digits when
    // stripping leaves an impossible length: `+1 123 456 7890` stays `1234567890`). Undo that here.
    let digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();
    let unstripped = if trimmed.starts_with('+') {
        digits.strip_prefix(&code.to_string()).map(str::to_owned)
    } else if phonenumber::metadata::DATABASE
        .by_id(default_region.as_ref())
        .is_some_and(|m| m.country_code() == code)
    {
        Some(digits)
    } else {
        None
    };
    // Whose numbering plan applies: the number's own region when it says it, else the account's region
    // for a national number; `None` (every region of the code) when neither tells.
    let region = if trimmed.starts_with('+') {
        number
            .country()
            .id()
            .and_then(|id| phonenumber::metadata::DATABASE.by_id(id.as_ref()))
    } else {
        phonenumber::metadata::DATABASE
            .by_id(default_region.as_ref())
            .filter(|m| m.country_code() == code)
    };
    let is_possible = |national: &str| is_possible(code, national, region);
    let national = if is_possible(&parsed) {
        parsed
    } else {
        // `+44 (0)20 ...`: a national prefix written inside an international number.
        let without_trunk_prefix = phonenumber::metadata::DATABASE
            .by_code(&code)
            .and_then(|metas| {
                metas
                    .into_iter()
                    .find_map(|m| m.national_prefix().and_then(|p| parsed.strip_prefix(p)))
            })
            .filter(|rest| is_possible(rest))
            .map(str::to_owned);
        match (unstripped, without_trunk_prefix) {
            (Some(u), _) if u.ends_with(&parsed) && is_possible(&u) => u,
            (_, Some(rest)) => rest,
            _ if is_possible_locally(code, &parsed, region) => {
                return Err("is a local number without its area code: X cannot match it; send the full number (E.164: +15551234567)")
            }
            _ => {
                return Err(
                    "is not a possible phone number: wrong number of digits for its country",
                )
            }
        }
    };
    Ok(format!("+{code}{national}"))
}

/// libphonenumber's "possible only locally": a length its numbering plan allows for dialling within an
/// area (`555-1234` in the US), not a number anyone outside that area (X) can match.
fn is_possible_locally(code: u16, national: &str, region: Option<&'static Metadata>) -> bool {
    let len = national.len() as u16;
    plans(code, region).iter().any(|m| {
        let d = m.descriptors();
        [Some(d.general()), d.fixed_line(), d.mobile()]
            .into_iter()
            .flatten()
            .any(|desc| desc.possible_local_length().contains(&len))
    })
}

/// The numbering plans to judge a number of country `code` by: `region`'s when known, else every region's
/// of the code (Canada's seven-digit service numbers must not make `555-1234` possible in the US).
fn plans(code: u16, region: Option<&'static Metadata>) -> Vec<&'static Metadata> {
    match region {
        Some(m) => vec![m],
        None => phonenumber::metadata::DATABASE
            .by_code(&code)
            .unwrap_or_default(),
    }
}

/// libphonenumber's "possible number": the national number's length is one its numbering plan allows.
fn is_possible(code: u16, national: &str, region: Option<&'static Metadata>) -> bool {
    let len = national.len() as u16;
    plans(code, region).iter().any(|m| {
        let d = m.descriptors();
        [
            Some(d.general()),
            d.fixed_line(),
            d.mobile(),
            d.toll_free(),
            d.premium_rate(),
            d.shared_cost(),
            d.personal_number(),
            d.voip(),
            d.pager(),
            d.uan(),
            d.voicemail(),
        ]
        .into_iter()
        .flatten()
        .any(|desc| desc.possible_length().contains(&len))
    })
}

/// `hashed_phone_number` for a raw number or an existing digest.
pub fn hashed_phone(
    raw: &str,
    default_region: phonenumber::country::Id,
) -> Result<String, &'static str> {
    match as_sha256_digest(raw) {
        Some(d) => Ok(d),
        None => normalize_phone(raw, default_region).map(|e| sha256_hex(&e)),
    }
}

/// The `twclid` query parameter of a landing-page URL, when present and non-empty.
pub fn twclid_from_url(url: &Url) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == "twclid")
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// jane@example.org's digest from the shared, independently computed vectors.
    const JANE_ORG: &str = "13d855ce931073d4924ac377cda0e9a543908b9d6607727c8033d729c65eced6";

    #[test]
    fn format_characters_are_removed_before_hashing() {
        for input in [
            "ja\u{200b}ne@example.org",
            "\u{feff}jane@example.org",
            "jane@exa\u{200d}mple.org",
            " \u{2060}Jane@Example.org\u{200e} ",
            "jane\u{ad}@example.org",
        ] {
            assert_eq!(hashed_email(input).as_deref(), Ok(JANE_ORG), "{input:?}");
        }
    }

    #[test]
    fn an_address_has_one_at_and_at_most_254_bytes() {
        assert!(normalize_email("a@b@example.com").is_err());
        assert!(normalize_email("jane@@example.com").is_err());
        let local = "a".repeat(64);
        let domain = format!("{}.com", "b".repeat(254 - 64 - 1 - 4));
        let longest = format!("{local}@{domain}");
        assert_eq!(longest.len(), 254);
        assert_eq!(normalize_email(&longest), Ok(longest.clone()));
        assert!(normalize_email(&format!("a{longest}")).is_err());
        let huge = format!("{}@example.com", "a".repeat(1 << 20));
        let e = normalize_email(&huge).unwrap_err();
        assert!(e.contains("254"), "{e}");
    }

    fn us() -> phonenumber::country::Id {
        phonenumber::country::Id::US
    }

    #[test]
    fn possible_but_unallocated_numbers_are_kept_whole() {
        assert_eq!(
            normalize_phone("(123) 456-7890", us()).unwrap(),
            "+11234567890"
        );
        assert_eq!(
            normalize_phone("1 (650) 253-0000", us()).unwrap(),
            "+16502530000"
        );
        assert_eq!(
            normalize_phone("+44 (0)20 7946 0958", us()).unwrap(),
            "+442079460958"
        );
        assert!(normalize_phone("+1 650 253 00001234", us()).is_err());
    }

    /// Regions of the differential property: the US and Canada, NANP regions with national-prefix rules
    /// (Antigua, the Bahamas, Jamaica), and others whose prefixes differ (0, 8, 06, none).
    const FAST_PATH_REGIONS: [&str; 14] = [
        "US", "CA", "AG", "BS", "JM", "PR", "GB", "DE", "FR", "RU", "HU", "IN", "BR", "AR",
    ];

    #[test]
    fn the_fast_path_takes_the_common_shapes_and_declines_the_rest() {
        for (input, e164) in [
            ("+1 (650) 253-0000", "+16502530000"),
            ("(650) 253-0000", "+16502530000"),
            ("1-650-253-0000", "+16502530000"),
            ("650.253.0000", "+16502530000"),
            ("+16502530000", "+16502530000"),
        ] {
            assert_eq!(
                nanp_fast_path(input, us()).as_deref(),
                Some(e164),
                "{input}"
            );
            assert_eq!(
                normalize_phone_parsed(input, us()).as_deref(),
                Ok(e164),
                "{input}"
            );
        }
        for declined in [
            "+44 20 7946 0958",
            "555-1234",
            "(123) 456-7890",
            "+1 650 253 0000 x12",
            "650-253-0000",
        ] {
            let region = if declined == "650-253-0000" {
                "GB".parse().unwrap()
            } else {
                us()
            };
            assert_eq!(nanp_fast_path(declined, region), None, "{declined}");
        }
    }

    #[test]
    fn national_number_keeps_italian_leading_zero() {
        assert_eq!(
            normalize_phone("+39 06 1234 5678", us()).unwrap(),
            "+390612345678"
        );
    }

    #[test]
    fn errors_never_echo_the_value() {
        for bad in ["secret.person@", "a b@example.com", "not-an-email"] {
            let e = normalize_email(bad).unwrap_err();
            assert!(!e.contains("secret") && !e.contains(bad));
        }
    }

    proptest! {
        #[test]
        fn email_normalization_is_idempotent(local in "[A-Za-z0-9._%+-]{1,20}", domain in "[A-Za-z0-9-]{1,12}\\.[A-Za-z]{2,6}", pad in "[ \t]{0,3}") {
            let raw = format!("{pad}{local}@{domain}{pad}");
            let once = normalize_email(&raw).unwrap();
            prop_assert_eq!(normalize_email(&once).unwrap(), once.clone());
            prop_assert!(!once.is_empty());
        }

        #[test]
        fn digests_are_never_hashed_again(bytes in proptest::collection::vec(any::<u8>(), 32), upper in any::<bool>()) {
            let d = hex::encode(bytes);
            let input = if upper { d.to_uppercase() } else { d.clone() };
            prop_assert_eq!(hashed_email(&input).unwrap(), d.clone());
            prop_assert_eq!(hashed_phone(&input, us()).unwrap(), d);
        }

        #[test]
        fn phone_normalization_is_idempotent(digits in "[2-9][0-9]{2}[2-9][0-9]{6}") {
            let e164 = normalize_phone(&digits, us()).unwrap();
            prop_assert_eq!(normalize_phone(&e164, us()).unwrap(), e164.clone());
            prop_assert!(e164.starts_with("+1"));
        }

        /// The fast path gives exactly what the parser gives, for numbers in its shapes and near them
        /// (other digit counts, leading 0 or 1, stray characters), in regions with and without national
        /// prefix rules, in and outside North America.
        #[test]
        fn the_fast_path_gives_what_the_parser_gives(
            plus in any::<bool>(),
            one in any::<bool>(),
            digits in prop_oneof!["[2-9][0-9]{9}", "[0-9]{6,12}"],
            seps in proptest::collection::vec(0usize..9, 13),
            region in 0usize..FAST_PATH_REGIONS.len(),
        ) {
            let region: phonenumber::country::Id = FAST_PATH_REGIONS[region].parse().unwrap();
            let mut input = String::new();
            if plus { input.push('+'); }
            if one { input.push('1'); }
            for (i, d) in digits.chars().enumerate() {
                input.push_str(["", " ", "-", ".", "(", ")", "", "  ", "/"][seps[i]]);
                input.push(d);
            }
            prop_assert_eq!(normalize_phone(&input, region), normalize_phone_parsed(input.trim(), region), "{:?} in {:?}", input, region);
        }

        #[test]
        fn normalizers_never_return_empty(s in ".{0,40}") {
            if let Ok(v) = hashed_email(&s) { prop_assert_eq!(v.len(), 64); }
            if let Ok(v) = hashed_phone(&s, us()) { prop_assert_eq!(v.len(), 64); }
        }
    }
}
