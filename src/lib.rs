//! conversion-gateway: a durable, budgeted, signed relay of conversion events to the X Ads Conversions API.
//!
//! Data flows one way: `api` (ingest) -> `conversion` (validate, normalize, hash) -> `spool` (keep) ->
//! `dispatch` (batch per account) -> `upstream` (sign, send, classify). `fake_x` is a faithful stand-in for X.
#![forbid(unsafe_code)]

pub mod activity;
pub mod api;
pub mod app;
#[doc(hidden)]
pub mod apt;
pub mod clock;
pub mod config;
pub mod conversion;
pub mod dispatch;
pub mod fake_x;
pub mod fd_limit;
#[doc(hidden)]
pub mod fuzzing;
pub mod healthcheck;
pub mod limiter;
pub mod metrics;
pub mod ports;
pub mod preview;
pub mod privacy;
pub mod reasons;
pub mod redis_store;
pub mod setup;
pub mod shutdown;
pub mod spool;
pub mod telemetry;
pub mod units;
pub mod upstream;
pub mod x_contract;
