//! Time as zonecast stores and sends it.

use chrono::{DateTime, SubsecRound, Utc};

/// Wall-clock time as stored and sent: UTC, millisecond precision, so an event read back
/// from either database renders to the same bytes as when it was published.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// The one wire format for times (DESIGN §4): `2026-11-24T12:00:00.123Z`.
pub fn format_time(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}
