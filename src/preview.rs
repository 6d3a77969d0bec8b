//! `conversion-gateway preview`: what each event of a file would become, without sending or storing
//! anything — so a backend team can check its integration before going live.
//!
//! Pure: the caller passes the text, the rules and `now`. Invariant: the report holds only what ingest
//! would keep (hashes, never a raw email or phone number) and the same judgement ingest would make.

use crate::conversion::{events_of, map_event, Conversion, FieldError, Judgement, Rules};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Serialize, PartialEq)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Preview {
    /// Would be spooled and sent to X as `conversion`, to the account's pixel.
    Accepted {
        index: usize,
        account: String,
        pixel_id: String,
        conversion: Box<Conversion>,
        /// Identifiers left out because they could not be used (a strong one remained), with why.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        dropped: Vec<FieldError>,
    },
    /// `opt_out: true`: would never be stored nor sent.
    Suppressed {
        index: usize,
        account: Option<String>,
    },
    Rejected {
        index: usize,
        errors: Vec<FieldError>,
    },
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Report {
    pub accepted: usize,
    pub suppressed: usize,
    pub rejected: usize,
    pub events: Vec<Preview>,
}

/// The events of `input`: one event object, a JSON array of them, `{"events": [...]}` (the body of
/// `POST /v1/events`), or one event object per line (JSON Lines).
fn events(input: &str) -> Result<Vec<Value>, String> {
    match serde_json::from_str::<Value>(input) {
        Ok(Value::Array(list)) => Ok(list),
        Ok(body) => events_of(body),
        Err(whole) => input
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, l)| {
                serde_json::from_str(l).map_err(|e| {
                    if n == 0 {
                        format!("the input is not JSON: {whole}")
                    } else {
                        format!("line {}: not JSON ({e})", n + 1)
                    }
                })
            })
            .collect(),
    }
}

pub fn preview(input: &str, rules: &Rules, now: DateTime<Utc>) -> Result<Report, String> {
    let events = events(input)?;
    if events.is_empty() {
        return Err("no events in the input".into());
    }
    let mut report = Report {
        accepted: 0,
        suppressed: 0,
        rejected: 0,
        events: Vec::with_capacity(events.len()),
    };
    for (index, raw) in events.iter().enumerate() {
        report.events.push(match map_event(raw, rules, now) {
            Judgement::Accepted {
                account,
                conversion,
                dropped,
                ..
            } => {
                report.accepted += 1;
                Preview::Accepted {
                    index,
                    pixel_id: rules
                        .accounts
                        .get(&account)
                        .map(|a| a.pixel_id.clone())
                        .unwrap_or_default(),
                    account,
                    conversion: Box::new(conversion),
                    dropped,
                }
            }
            Judgement::Suppressed { account } => {
                report.suppressed += 1;
                Preview::Suppressed { index, account }
            }
            Judgement::Rejected(errors) => {
                report.rejected += 1;
                Preview::Rejected { index, errors }
            }
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversion::AccountRules;
    use std::time::Duration;

    fn rules() -> Rules {
        Rules {
            accounts: [(
                "acme".to_string(),
                AccountRules {
                    pixel_id: "o9d7n".into(),
                    events: [("purchase".to_string(), "o9d2g".to_string())].into(),
                    default_phone_region: phonenumber::country::Id::US,
                },
            )]
            .into(),
            max_event_age: Duration::from_secs(7 * 86400),
            max_event_bytes: 64 << 10,
        }
    }

    #[test]
    fn every_input_form_gives_the_same_judgements() {
        let a = r#"{"event": "purchase", "email": "Jane.Doe@Example.com", "conversion_id": "1"}"#;
        let b = r#"{"event": "refund", "twclid": "t"}"#;
        let c = r#"{"event": "purchase", "twclid": "t", "opt_out": true}"#;
        let now = Utc::now();
        let forms = [
            format!("[{a},{b},{c}]"),
            format!("{{\"events\": [{a},{b},{c}]}}"),
            format!("{a}\n{b}\n\n{c}\n"),
        ];
        let reports: Vec<Report> = forms
            .iter()
            .map(|f| preview(f, &rules(), now).unwrap())
            .collect();
        assert!(reports.windows(2).all(|w| w[0] == w[1]));
        let r = &reports[0];
        assert_eq!((r.accepted, r.suppressed, r.rejected), (1, 1, 1));
        let Preview::Accepted {
            pixel_id,
            conversion,
            ..
        } = &r.events[0]
        else {
            panic!("{:?}", r.events[0]);
        };
        assert_eq!(pixel_id, "o9d7n");
        assert_eq!(conversion.event_id, "o9d2g");
        let shown = serde_json::to_string(r).unwrap();
        assert!(
            !shown.to_lowercase().contains("jane"),
            "hashes only: {shown}"
        );
        assert!(shown.contains(r#""outcome":"rejected""#) && shown.contains(r#""field":"event""#));
        let single = preview(a, &rules(), now).unwrap();
        assert_eq!(single.events.len(), 1);
    }

    #[test]
    fn a_dropped_identifier_is_shown_as_ingest_answers_it() {
        let report = preview(
            r#"{"event": "purchase", "email": "jane@example.com", "phone": "555-1234"}"#,
            &rules(),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(report.accepted, 1);
        let json = serde_json::to_value(&report.events[0]).unwrap();
        assert_eq!(json["dropped"][0]["field"], "phone", "{json}");
        assert!(!json.to_string().contains("555-1234"), "{json}");
        // Nothing dropped: no `dropped` key.
        let report = preview(
            r#"{"event": "purchase", "twclid": "t"}"#,
            &rules(),
            Utc::now(),
        )
        .unwrap();
        assert!(serde_json::to_value(&report.events[0])
            .unwrap()
            .get("dropped")
            .is_none());
    }

    #[test]
    fn unusable_input_says_where() {
        let now = Utc::now();
        assert!(preview("", &rules(), now)
            .unwrap_err()
            .contains("no events"));
        assert!(preview("[]", &rules(), now)
            .unwrap_err()
            .contains("no events"));
        assert!(preview("{\"a\": 1}\nnope", &rules(), now)
            .unwrap_err()
            .contains("line 2"));
        assert!(preview("nope", &rules(), now)
            .unwrap_err()
            .contains("not JSON"));
        assert!(preview("5", &rules(), now)
            .unwrap_err()
            .contains("event object"));
    }
}
