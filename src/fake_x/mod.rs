//! A faithful fake of the X Conversions endpoint, for tests, local runs and benchmarks.
pub mod contract;
