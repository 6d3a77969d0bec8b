//! Time and money formats of the X wire contract. Pure functions, no clock: callers pass `now`.

use chrono::{DateTime, SecondsFormat, Timelike, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::Value;
use std::str::FromStr;

/// Parses RFC 3339 with any offset and any fraction. A time without an offset is refused: its zone is unknown.
pub fn parse_time(input: &str) -> Result<DateTime<Utc>, String> {
    let t = DateTime::parse_from_rfc3339(input.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            format!("{input:?} is not an RFC 3339 time with an offset; send e.g. \"2022-02-18T01:14:00.603Z\" or \"2022-02-18T02:14:00+01:00\"")
        })?;
    // chrono keeps a leap second (:60) as a nanosecond count past one second; X's format has no :60.
    if t.nanosecond() >= 1_000_000_000 {
        return Err(format!(
            "{input:?} has a seconds field of 60 (a leap second), which X's format does not have; send :59.999 or the next second"
        ));
    }
    Ok(t)
}

/// X's wire format: UTC, `yyyy-MM-ddTHH:mm:ss.SSSZ`; fractions beyond milliseconds are truncated.
pub fn wire_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A money value as a decimal string with two decimals (`20` -> `"20.00"`), half away from zero.
pub fn money(v: &Value) -> Result<String, String> {
    let text = match v {
        // f64's Display is the shortest text that round-trips, so 100.99 stays 100.99.
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_owned(),
        _ => return Err("must be a number or a decimal string such as \"20.00\"".into()),
    };
    let d = Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .map_err(|_| {
            format!("{text:?} is not a decimal number; send e.g. 20, 20.5 or \"20.00\"")
        })?;
    if d.is_sign_negative() && !d.is_zero() {
        return Err(format!(
            "{text} is negative; a conversion value must be zero or more"
        ));
    }
    let mut d = d.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
    d.rescale(2);
    if d.scale() != 2 {
        // Too many digits to carry two decimals (28 significant digits at most).
        return Err(format!(
            "{text} is too large; a value must be below 10^26 so that it can be sent with two decimals"
        ));
    }
    Ok(d.to_string())
}

/// A price as a JSON number that always carries a decimal point (`20` -> `20.0`).
pub fn price(v: &Value) -> Result<f64, String> {
    let f = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|f| f.is_finite())
    .ok_or_else(|| "must be a number such as 100.99".to_string())?;
    if f < 0.0 {
        return Err("must be zero or more".into());
    }
    Ok(f)
}

/// ISO 4217 code, upper case.
pub fn currency(input: &str) -> Result<String, String> {
    let code = input.trim().to_ascii_uppercase();
    iso_currency::Currency::from_code(&code)
        .map(|c| c.code().to_owned())
        .ok_or_else(|| format!("{input:?} is not an ISO 4217 currency code such as USD or EUR"))
}

/// A positive integer, given as a JSON number or as a string: one rule for both (`3`, `"3"`, `1e3` and
/// `"1e3"` alike); beyond 64 bits it is out of range, never clamped.
pub fn positive_int(v: &Value) -> Result<u64, String> {
    const WHOLE: &str = "must be a whole number greater than 0";
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_owned(),
        _ => return Err(WHOLE.into()),
    };
    if let Ok(n) = text.parse::<u64>() {
        return if n > 0 { Ok(n) } else { Err(WHOLE.into()) };
    }
    // Not plain digits: a decimal or scientific form, or a number too large for 64 bits.
    let Ok(f) = text.parse::<f64>() else {
        return Err(WHOLE.into());
    };
    if f.is_finite() && f >= u64::MAX as f64 {
        return Err(format!("{text} is out of range; at most {}", u64::MAX));
    }
    let d = Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .map_err(|_| WHOLE.to_string())?;
    if !d.fract().is_zero() || d <= Decimal::ZERO {
        return Err(WHOLE.into());
    }
    u64::try_from(d).map_err(|_| format!("{text} is out of range; at most {}", u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn money_rounds_and_pads() {
        assert_eq!(money(&json!(0.1 + 0.2)).unwrap(), "0.30");
        assert_eq!(money(&json!(10.005)).unwrap(), "10.01");
        assert_eq!(money(&json!("1e3")).unwrap(), "1000.00");
        assert_eq!(money(&json!(0)).unwrap(), "0.00");
        assert!(money(&json!(-1)).is_err());
        assert!(money(&json!("1,000.00")).is_err());
        assert!(money(&json!(true)).is_err());
    }

    #[test]
    fn currency_and_counts() {
        assert_eq!(currency(" usd ").unwrap(), "USD");
        assert!(currency("XYZ").is_err());
        assert!(currency("US").is_err());
        assert_eq!(positive_int(&json!("3")).unwrap(), 3);
        assert!(positive_int(&json!(0)).is_err());
        assert!(positive_int(&json!(1.5)).is_err());
        assert!(positive_int(&json!(-2)).is_err());
    }

    #[test]
    fn a_leap_second_is_refused() {
        for input in [
            "2026-06-30T08:00:60Z",
            "2026-12-31T23:59:60.500Z",
            "2026-12-31T23:59:60+00:00",
        ] {
            let e = parse_time(input).unwrap_err();
            assert!(e.contains("leap second"), "{input}: {e}");
        }
        assert_eq!(
            wire_time(parse_time("2026-12-31T23:59:59.999Z").unwrap()),
            "2026-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn values_that_cannot_carry_two_decimals_are_refused() {
        assert_eq!(
            money(&json!(1e26)).unwrap(),
            "100000000000000000000000000.00"
        );
        for too_large in [json!(1e27), json!(1e28), json!("1e27"), json!(1e300)] {
            let e = money(&too_large).unwrap_err();
            assert!(
                e.contains("too large") || e.contains("not a decimal"),
                "{too_large}: {e}"
            );
        }
    }

    #[test]
    fn counts_follow_one_rule_as_numbers_and_as_strings() {
        for (v, want) in [
            (json!(3), Ok(3)),
            (json!("3"), Ok(3)),
            (json!(1e3), Ok(1000)),
            (json!("1e3"), Ok(1000)),
            (json!(18446744073709551615u64), Ok(u64::MAX)),
            (json!("18446744073709551615"), Ok(u64::MAX)),
        ] {
            assert_eq!(positive_int(&v), want, "{v}");
        }
        for out_of_range in [
            json!(1e20),
            json!("1e20"),
            json!(1e300),
            json!("100000000000000000000"),
        ] {
            let e = positive_int(&out_of_range).unwrap_err();
            assert!(e.contains("out of range"), "{out_of_range}: {e}");
        }
        for not_whole in [
            json!(0),
            json!("0"),
            json!(1.5),
            json!("1.5"),
            json!(-2),
            json!("x"),
            json!(true),
        ] {
            assert!(positive_int(&not_whole).is_err(), "{not_whole}");
        }
    }

    #[test]
    fn prices_carry_a_decimal_point() {
        assert_eq!(
            serde_json::to_string(&price(&json!(20)).unwrap()).unwrap(),
            "20.0"
        );
        assert_eq!(
            serde_json::to_string(&price(&json!(100.99)).unwrap()).unwrap(),
            "100.99"
        );
    }

    proptest! {
        #[test]
        fn money_always_has_two_decimals(cents in 0u64..10_000_000_000) {
            let v = money(&json!(cents as f64 / 100.0)).unwrap();
            let (whole, frac) = v.split_once('.').unwrap();
            prop_assert_eq!(frac.len(), 2);
            prop_assert_eq!(format!("{whole}{frac}").parse::<u64>().unwrap(), cents);
            prop_assert_eq!(money(&json!(v.clone())).unwrap(), v);
        }

        #[test]
        fn wire_time_is_exact_format(secs in 0i64..4_000_000_000, nanos in 0u32..1_000_000_000) {
            let t = DateTime::from_timestamp(secs, nanos).unwrap();
            let s = wire_time(t);
            prop_assert_eq!(s.len(), 24);
            prop_assert!(s.ends_with('Z') && &s[19..20] == ".");
            prop_assert_eq!(wire_time(parse_time(&s).unwrap()), s);
        }
    }
}
