//! The time at the head of a log line, `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn`, as Firecracker
//! writes it. In UTC: local time would need the time-zone file, which a thread under
//! seccomp may not open. Written by hand because it must not allocate (the seccomp
//! handler formats with it) and no crate in the tree formats a date without a heap.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// A moment since the epoch, shown as a UTC date and time.
pub struct Utc {
    secs: u64,
    nanos: u32,
}

impl Utc {
    /// Now.
    pub fn now() -> Utc {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Utc {
            secs: since.as_secs(),
            nanos: since.subsec_nanos(),
        }
    }
}

/// The civil date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

impl fmt::Display for Utc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (year, month, day) = civil(self.secs / 86_400);
        let s = self.secs % 86_400;
        write!(
            f,
            "{year}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
            s / 3600,
            s / 60 % 60,
            s % 60,
            self.nanos
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_match_known_instants() {
        let at = |secs, nanos| Utc { secs, nanos }.to_string();
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000000");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000000005");
        assert_eq!(
            at(1_796_300_000, 123_456_789),
            "2026-12-03T12:13:20.123456789"
        );
    }
}
