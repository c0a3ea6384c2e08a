//! The plugins built into MoltBot.

mod calculator;
mod datetime;
mod http_json;

pub use calculator::Calculator;
pub use datetime::DateTime;
pub use http_json::HttpJson;
