//! The `grpc-timeout` header: a call's time budget, read by servers that end work at the caller's deadline and
//! rewritten by `Replicas` when it resends a call with what is left.

use std::time::Duration;

use tonic::codegen::http::{HeaderMap, HeaderValue};

pub const HEADER: &str = "grpc-timeout";

/// The budget a call's headers (or `MetadataMap::as_ref()`) carry, if any and well formed.
pub fn read(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(HEADER)?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The header value for `left`: whole milliseconds rounded up, or seconds where milliseconds would take more than
/// the eight digits the header allows.
pub fn value(left: Duration) -> HeaderValue {
    let millis = left.as_nanos().div_ceil(1_000_000);
    let value =
        if millis < 100_000_000 { format!("{millis}m") } else { format!("{}S", left.as_secs().min(99_999_999)) };
    value.parse().expect("digits and a unit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_read_in_every_unit_and_written_within_eight_digits() {
        let parse = |v: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(HEADER, v.parse().unwrap());
            read(&headers)
        };
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("300S"), Some(Duration::from_secs(300)));
        assert_eq!(parse("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        assert_eq!((parse("S"), parse("10x"), parse("12x"), parse("")), (None, None, None, None));
        let header = |d: Duration| value(d).to_str().unwrap().to_owned();
        assert_eq!(header(Duration::from_micros(1500)), "2m", "rounded up, never 0 while time is left");
        assert_eq!(header(Duration::from_secs(300)), "300000m");
        assert_eq!(header(Duration::from_secs(200_000)), "200000S", "eight digits at most");
    }
}
