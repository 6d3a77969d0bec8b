//! The status page (`GET /` on the admin listener) and the report it is drawn from (`GET /v1/activity`).
//!
//! # What it shows
//! Per account: received / delivered / rejected / dead-lettered per minute over the last hour (a small
//! chart, from `crate::activity`), the backlog and its oldest event, the budget used now against the limit,
//! paused and why, X's last status and `debug_id`, and the dead letters since start by reason.
//!
//! # Invariants
//! - One self-contained page: no external asset, script or font; it refreshes itself by fetching itself
//!   (and with `<meta refresh>` where scripts are off). Like `/metrics`, it needs no key.
//! - Nothing on it or in the report is a secret, an identifier an event carried, or the text of X's error
//!   messages (which can quote identifiers): names and ids of the configuration, counts, times, X's status
//!   codes and `debug_id`s, and reasons from fixed vocabularies. Every string is HTML-escaped.
//! - Rendering is pure: `render(&ActivityReport)` is a function of the report alone.

use crate::activity::{Minute, MINUTES};
use crate::reasons::{DeadLetterReason, PauseReason};
use crate::units::bytes;
use serde::Serialize;
use std::fmt::Write;

/// What `/v1/activity` answers and the page shows.
#[derive(Debug, Clone, Serialize)]
pub struct ActivityReport {
    pub generated_at: String,
    /// Minutes per series (the last hour), oldest first.
    pub minutes: usize,
    pub accounts: Vec<AccountActivity>,
    /// Events rejected at ingest that named no configured account.
    pub unattributed: Vec<MinuteAt>,
    pub spool: SpoolState,
}

#[derive(Debug, Clone, Serialize)]
pub struct AccountActivity {
    pub name: String,
    pub ad_account_id: String,
    pub pixel_id: String,
    /// Why sending is paused; null while it is not.
    pub paused: Option<PauseReason>,
    pub backlog_events: u64,
    pub oldest_event_at: Option<String>,
    pub oldest_event_age_seconds: Option<u64>,
    pub budget_limit: u64,
    pub budget_window_seconds: u64,
    /// Events this gateway delivered in the last `budget_window_seconds` (at most the hour kept), against
    /// `budget_limit`. In the shared mode the other replicas' deliveries draw on the budget too.
    pub budget_used: u64,
    /// Events the budget lets go at once now (the rate limiter's own state: the fleet's in the shared mode).
    pub budget_available_now: u64,
    /// X's hold (a 429's reset), while it lasts.
    pub held_until: Option<String>,
    pub last_status: Option<String>,
    pub last_debug_id: Option<String>,
    /// When the last failure was (its message is in `/v1/accounts`, not here).
    pub last_error_at: Option<String>,
    /// Dead letters since start, per reason (reasons with none left out).
    pub dead_letters_by_reason: Vec<(DeadLetterReason, u64)>,
    pub per_minute: Vec<MinuteAt>,
}

/// One minute's counts and the minute's start.
#[derive(Debug, Clone, Serialize)]
pub struct MinuteAt {
    pub at: String,
    #[serde(flatten)]
    pub counts: Minute,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpoolState {
    pub bytes: u64,
    pub max_bytes: u64,
    pub dead_letters: u64,
    /// Why it refuses events, while it does.
    pub refusing_because: Option<String>,
}

/// One series of a chart: its label, CSS class, and value in a minute.
type Series = (&'static str, &'static str, fn(&Minute) -> u64);

const SERIES: [Series; 4] = [
    ("received", "received", |m| m.received),
    ("delivered", "delivered", |m| m.delivered),
    ("rejected", "rejected", |m| m.rejected),
    ("dead-lettered", "dead", |m| m.dead_lettered),
];

const WIDTH: f64 = 240.0;
const HEIGHT: f64 = 56.0;

/// The page.
pub fn render(report: &ActivityReport) -> String {
    let mut out = String::with_capacity(16 * 1024);
    out.push_str(HEAD);
    let _ = write!(
        out,
        "<header><h1>conversion-gateway</h1><span>{}</span><span id=\"updated\">as of {}</span></header>\n<main id=\"status\">\n",
        esc(env!("CARGO_PKG_VERSION")),
        esc(&report.generated_at)
    );
    spool_line(&mut out, &report.spool);
    out.push_str("<p class=\"legend\">last hour, per minute:");
    for (label, class, _) in SERIES {
        let _ = write!(out, " <span class=\"key {class}\"></span>{label}");
    }
    out.push_str("</p>\n<table>\n<thead><tr><th>account</th><th>state</th><th>backlog</th><th>budget now</th><th>X's last answer</th><th>dead letters</th><th>last hour</th></tr></thead>\n<tbody>\n");
    for a in &report.accounts {
        account_row(&mut out, a);
    }
    out.push_str("</tbody>\n</table>\n");
    let unattributed: u64 = report.unattributed.iter().map(|m| m.counts.rejected).sum();
    if unattributed > 0 {
        let _ = writeln!(
            out,
            "<p class=\"note\">{unattributed} events rejected in the last hour named no configured account.</p>"
        );
    }
    out.push_str("</main>\n");
    out.push_str(SCRIPT);
    out.push_str("</body>\n</html>\n");
    out
}

fn spool_line(out: &mut String, s: &SpoolState) {
    let pct = if s.max_bytes > 0 {
        s.bytes as f64 * 100.0 / s.max_bytes as f64
    } else {
        0.0
    };
    let _ = write!(
        out,
        "<p class=\"spool\">spool: {} of {} ({pct:.1}%), {} dead letters kept",
        bytes(s.bytes),
        bytes(s.max_bytes),
        s.dead_letters
    );
    match &s.refusing_because {
        Some(why) => {
            let _ = write!(
                out,
                " — <strong class=\"bad\">refusing events: {}</strong>",
                esc(why)
            );
        }
        None => out.push_str(" — taking events"),
    }
    out.push_str("</p>\n");
}

fn account_row(out: &mut String, a: &AccountActivity) {
    let sent_recently = a
        .per_minute
        .iter()
        .rev()
        .take(5)
        .any(|m| m.counts.delivered > 0);
    let (state, label) = match a.paused {
        Some(r) => ("paused", format!("paused: {}", pause_words(r))),
        None if a.held_until.is_some() => ("held", "held by X's rate limit".to_owned()),
        None if a.backlog_events > 0 => ("sending", "sending".to_owned()),
        None if sent_recently => ("sending", "sending".to_owned()),
        None => ("idle", "idle".to_owned()),
    };
    let _ = write!(
        out,
        "<tr data-account=\"{}\" data-state=\"{state}\">\n<td><b>{}</b><br><small>ad account {} · pixel {}</small></td>\n<td class=\"state {state}\">{}</td>\n",
        esc(&a.name),
        esc(&a.name),
        esc(&a.ad_account_id),
        esc(&a.pixel_id),
        esc(&label)
    );
    let oldest = match a.oldest_event_age_seconds {
        Some(s) => format!("<br><small>oldest {} old</small>", age(s)),
        None => String::new(),
    };
    let _ = writeln!(out, "<td>{} events{oldest}</td>", a.backlog_events);
    let used_pct = if a.budget_limit > 0 {
        (a.budget_used as f64 * 100.0 / a.budget_limit as f64).min(100.0)
    } else {
        0.0
    };
    let _ = writeln!(
        out,
        "<td>{} of {} sent in the last {}<div class=\"bar\"><div style=\"width:{used_pct:.1}%\"></div></div><small>{} may go at once</small>{}</td>",
        a.budget_used,
        a.budget_limit,
        age(a.budget_window_seconds),
        a.budget_available_now,
        a.held_until
            .as_deref()
            .map(|t| format!("<br><small>held until {}</small>", esc(t)))
            .unwrap_or_default()
    );
    let last = match (&a.last_status, &a.last_debug_id) {
        (None, _) => "nothing sent yet".to_owned(),
        (Some(s), Some(d)) => format!("{}<br><small>debug_id {}</small>", esc(s), esc(d)),
        (Some(s), None) => esc(s),
    };
    let failed = a
        .last_error_at
        .as_deref()
        .map(|t| format!("<br><small>last failure {}</small>", esc(t)))
        .unwrap_or_default();
    let _ = writeln!(out, "<td>{last}{failed}</td>");
    if a.dead_letters_by_reason.is_empty() {
        out.push_str("<td>none</td>\n");
    } else {
        out.push_str("<td>");
        for (i, (reason, n)) in a.dead_letters_by_reason.iter().enumerate() {
            if i > 0 {
                out.push_str("<br>");
            }
            let _ = write!(out, "{n} {}", reason.as_str());
        }
        out.push_str("</td>\n");
    }
    let _ = write!(out, "<td>{}</td>\n</tr>\n", chart(&a.per_minute));
}

/// A small chart of the four series, scaled to the largest minute.
fn chart(minutes: &[MinuteAt]) -> String {
    let max = minutes
        .iter()
        .flat_map(|m| SERIES.iter().map(move |(_, _, f)| f(&m.counts)))
        .max()
        .unwrap_or(0);
    let totals: Vec<String> = SERIES
        .iter()
        .map(|(label, _, f)| {
            format!(
                "{} {label}",
                minutes.iter().map(|m| f(&m.counts)).sum::<u64>()
            )
        })
        .collect();
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" data-max=\"{max}\" role=\"img\" aria-label=\"last hour: {}\"><title>last hour: {}; busiest minute {max}</title>",
        totals.join(", "),
        totals.join(", ")
    );
    let step = WIDTH / (MINUTES.max(2) - 1) as f64;
    for (_, class, f) in SERIES {
        let points: Vec<String> = minutes
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let y = if max == 0 {
                    HEIGHT - 1.0
                } else {
                    HEIGHT - 1.0 - (f(&m.counts) as f64 / max as f64) * (HEIGHT - 4.0)
                };
                format!("{:.1},{:.1}", i as f64 * step, y)
            })
            .collect();
        let _ = write!(
            svg,
            "<polyline class=\"{class}\" points=\"{}\"/>",
            points.join(" ")
        );
        // A dot on every minute something happened: a lone busy minute is seen, not a hairline.
        for (i, m) in minutes.iter().enumerate() {
            if f(&m.counts) > 0 {
                if let Some((x, y)) = points.get(i).and_then(|p| p.split_once(',')) {
                    let _ = write!(
                        svg,
                        "<circle class=\"{class}\" cx=\"{x}\" cy=\"{y}\" r=\"2\"/>"
                    );
                }
            }
        }
    }
    svg.push_str("</svg>");
    svg
}

fn pause_words(r: PauseReason) -> &'static str {
    match r {
        PauseReason::Unauthorized => "X refuses the credentials (401)",
        PauseReason::Forbidden => "the credentials lack access (403)",
        PauseReason::NotFound => "X knows no such pixel (404)",
    }
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

/// Text for HTML (element content and quoted attributes).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const HEAD: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>conversion-gateway status</title>
<noscript><meta http-equiv="refresh" content="15"></noscript>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2329; background: #fafbfc; }
header { display: flex; gap: 1em; align-items: baseline; }
header h1 { font-size: 1.3em; margin: 0; }
header span { color: #5b6670; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; vertical-align: top; padding: .5em .7em; border-bottom: 1px solid #e3e7eb; }
th { font-weight: 600; color: #5b6670; font-size: .9em; }
small { color: #5b6670; }
.state.paused { color: #b3261e; font-weight: 600; }
.state.held { color: #9a6700; font-weight: 600; }
.state.sending { color: #1a7f37; }
.state.idle { color: #5b6670; }
.bad { color: #b3261e; }
.bar { width: 8em; height: .45em; background: #e3e7eb; border-radius: .2em; margin-top: .3em; }
.bar div { height: 100%; background: #0969da; border-radius: .2em; }
svg.chart { background: #f6f8fa; border-radius: 3px; }
svg.chart polyline { fill: none; stroke-width: 1.5; }
svg.chart circle { stroke-width: 0; }
circle.received { fill: #0969da; } circle.delivered { fill: #1a7f37; } circle.rejected { fill: #bf8700; } circle.dead { fill: #b3261e; }
.received { stroke: #0969da; } .delivered { stroke: #1a7f37; } .rejected { stroke: #bf8700; } .dead { stroke: #b3261e; }
.key { display: inline-block; width: 1.2em; height: .25em; vertical-align: middle; margin-left: .6em; }
.key.received { background: #0969da; } .key.delivered { background: #1a7f37; }
.key.rejected { background: #bf8700; } .key.dead { background: #b3261e; }
.legend, .spool, .note { color: #5b6670; }
#stale { color: #b3261e; }
</style>
</head>
<body>
"#;

/// Fetches the page again every 10 s and swaps its `<main>`; says so when the gateway does not answer.
const SCRIPT: &str = r#"<script>
(function () {
  function refresh() {
    fetch(location.pathname, { cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        document.getElementById("status").innerHTML = doc.getElementById("status").innerHTML;
        document.getElementById("updated").textContent = doc.getElementById("updated").textContent;
        document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
      })
      .catch(function () {
        document.getElementById("updated").innerHTML = '<span id="stale">the gateway does not answer; showing the last page</span>';
      });
  }
  setInterval(refresh, 10000);
})();
</script>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn minute(i: u64, received: u64, delivered: u64) -> MinuteAt {
        MinuteAt {
            at: format!("t{i}"),
            counts: Minute {
                minute: i,
                received,
                delivered,
                rejected: 0,
                dead_lettered: 0,
            },
        }
    }

    fn account(name: &str, paused: Option<PauseReason>) -> AccountActivity {
        AccountActivity {
            name: name.into(),
            ad_account_id: "18ce552mlaq".into(),
            pixel_id: "o9d7n".into(),
            paused,
            backlog_events: 3,
            oldest_event_at: None,
            oldest_event_age_seconds: Some(95),
            budget_limit: 60_000,
            budget_window_seconds: 900,
            budget_used: 1_500,
            budget_available_now: 500,
            held_until: None,
            last_status: Some("200".into()),
            last_debug_id: Some("<dbg>".into()),
            last_error_at: None,
            dead_letters_by_reason: vec![(DeadLetterReason::Rejected, 2)],
            per_minute: (0..60).map(|i| minute(i, i % 7, i % 5)).collect(),
        }
    }

    fn report() -> ActivityReport {
        ActivityReport {
            generated_at: "2026-12-02T02:00:00Z".into(),
            minutes: 60,
            accounts: vec![
                account("shop", None),
                account("brand", Some(PauseReason::Unauthorized)),
            ],
            unattributed: Vec::new(),
            spool: SpoolState {
                bytes: 1 << 20,
                max_bytes: 1 << 30,
                dead_letters: 2,
                refusing_because: None,
            },
        }
    }

    #[test]
    fn each_account_is_a_row_with_its_state_and_a_chart_of_sixty_points() {
        let html = render(&report());
        assert!(html.contains("<tr data-account=\"shop\" data-state=\"sending\">"));
        assert!(html.contains("<tr data-account=\"brand\" data-state=\"paused\">"));
        assert!(html.contains("paused: X refuses the credentials (401)"));
        assert!(html.contains("1500 of 60000 sent in the last 15 min"));
        assert!(html.contains("500 may go at once"));
        assert!(html.contains("oldest 95 s old"));
        assert!(html.contains("2 rejected"));
        // Escaped, not markup.
        assert!(html.contains("debug_id &lt;dbg&gt;") && !html.contains("<dbg>"));
        let polyline = html
            .split("<polyline class=\"received\" points=\"")
            .nth(1)
            .unwrap();
        let points = polyline.split('"').next().unwrap().split(' ').count();
        assert_eq!(points, 60);
        // Self-contained: nothing fetched from elsewhere.
        assert!(!html.contains("http://") && !html.contains("https://") && !html.contains(" src="));
    }

    #[test]
    fn a_quiet_hour_is_a_flat_chart() {
        let mut r = report();
        r.accounts[0].per_minute = (0..60).map(|i| minute(i, 0, 0)).collect();
        r.accounts[0].backlog_events = 0;
        let html = render(&r);
        assert!(html.contains("data-account=\"shop\" data-state=\"idle\""));
        assert!(html.contains("data-max=\"0\""));
    }
}
