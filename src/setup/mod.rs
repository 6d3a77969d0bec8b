//! Getting an account set up right: `doctor` checks a configuration against X and the machine, and
//! `events` lists and creates an account's Single Event Tags — through the Ads API account endpoints
//! (`shared/x-ads-account-api.md`), signed like every call to X.
//!
//! # Parts
//! - `ads_api`: the client: signed calls, the Ads API envelope, every page of a list, X's `Date` kept.
//! - `judge`: pure: what one answer means, as a line passed, warned, failed or skipped, with what to do.
//! - `tag_spec`: pure: what a new tag may be (X's types and windows), shared with the fake of X.
//! - `doctor`: asks, judges, reports (text or JSON); `events`: the tag commands and what they print.
//!
//! # Invariants
//! - Nothing here sends a conversion or opens the spool: a setup check may run beside a live gateway.
//! - A check that cannot run is skipped with why and never fails the run; every failure says what to fix.
//! - No output holds a credential.

pub mod ads_api;
pub mod doctor;
pub mod events;
pub mod judge;
pub mod tag_spec;
