//! Retrying HTTP requests, shared by [`crate::OpenAiClient`] and the HTTP reward models of
//! safetune-eval: exponential backoff with jitter ([`Backoff`]) and a server's `Retry-After`
//! read defensively ([`retry_after_secs`], [`retry_after_ms`]).
//!
//! A `Retry-After` is honoured only as a number of seconds (or milliseconds, for
//! `retry-after-ms`) that is finite and not negative, and never for longer than a cap
//! ([`DEFAULT_MAX_RETRY_AFTER`] by default): `inf`, `nan`, `-5`, `abc`, an empty value and an
//! HTTP-date are ignored, so the client's own backoff applies, and `1e20` waits the cap. A server
//! can slow a run down by at most the cap per retry, and never stop it.

use std::time::Duration;

/// The longest `Retry-After` honoured unless a client is configured otherwise.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// A `Retry-After` value in seconds, cut to `cap`; `None` unless it is a finite, non-negative
/// number (an HTTP-date is not one: the caller's backoff applies).
pub fn retry_after_secs(value: &str, cap: Duration) -> Option<Duration> {
    non_negative(value).map(|s| capped(s, cap))
}

/// A `retry-after-ms` value (milliseconds, as some OpenAI-compatible servers send), cut to
/// `cap`; `None` unless it is a finite, non-negative number.
pub fn retry_after_ms(value: &str, cap: Duration) -> Option<Duration> {
    non_negative(value).map(|ms| capped(ms / 1000.0, cap))
}

/// The wait a response asks for: its `retry-after-ms` header if usable, else its
/// `retry-after`, each read as above.
pub fn retry_after(ms: Option<&str>, secs: Option<&str>, cap: Duration) -> Option<Duration> {
    ms.and_then(|v| retry_after_ms(v, cap))
        .or_else(|| secs.and_then(|v| retry_after_secs(v, cap)))
}

fn non_negative(value: &str) -> Option<f64> {
    let v: f64 = value.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v)
}

/// `secs` (finite, non-negative) as a duration of at most `cap`.
fn capped(secs: f64, cap: Duration) -> Duration {
    if secs >= cap.as_secs_f64() {
        cap
    } else {
        Duration::try_from_secs_f64(secs).map_or(cap, |d| d.min(cap))
    }
}

/// Backoff between the attempts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Before the first retry; doubles each retry.
    pub initial: Duration,
    /// The longest exponential step.
    pub max: Duration,
    /// The longest `Retry-After` honoured.
    pub max_retry_after: Duration,
}

impl Backoff {
    /// The delay before retry number `attempt` (1-based): `initial * 2^(attempt-1)` cut to
    /// `max`, with "equal jitter" (half of it fixed, half random), and never shorter than the
    /// server's `retry_after` cut to `max_retry_after`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let unit = (crate::random_u64() % 10_000) as f64 / 10_000.0;
        self.delay_at(attempt, retry_after, unit)
    }

    /// [`Backoff::delay`] with the random draw `unit` (in [0, 1)) given.
    pub fn delay_at(&self, attempt: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max);
        let half = exp / 2;
        let delay = half + half.mul_f64(unit.clamp(0.0, 1.0));
        match retry_after {
            Some(ra) => delay.max(ra.min(self.max_retry_after)),
            None => delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(60);

    #[test]
    fn retry_after_takes_only_finite_non_negative_numbers_and_caps_them() {
        let s = |v: &str| retry_after_secs(v, CAP);
        assert_eq!(s("0"), Some(Duration::ZERO));
        assert_eq!(s(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(s("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(s("120"), Some(CAP));
        assert_eq!(s("1e20"), Some(CAP));
        assert_eq!(s("1e308"), Some(CAP));
        for bad in [
            "inf",
            "-inf",
            "infinity",
            "nan",
            "NaN",
            "-5",
            "-0.001",
            "abc",
            "",
            "  ",
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "5s",
        ] {
            assert_eq!(s(bad), None, "{bad:?}");
        }
        let ms = |v: &str| retry_after_ms(v, CAP);
        assert_eq!(ms("250"), Some(Duration::from_millis(250)));
        assert_eq!(ms("1e20"), Some(CAP));
        assert_eq!(ms("inf"), None);
        assert_eq!(ms("-1"), None);
        // retry-after-ms first, then retry-after; an unusable one falls through.
        assert_eq!(
            retry_after(Some("100"), Some("9"), CAP),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            retry_after(Some("nan"), Some("9"), CAP),
            Some(Duration::from_secs(9))
        );
        assert_eq!(retry_after(None, Some("abc"), CAP), None);
        assert_eq!(retry_after(None, None, CAP), None);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_honours_a_capped_retry_after() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            max_retry_after: Duration::from_secs(5),
        };
        // Half fixed, half random.
        assert_eq!(b.delay_at(1, None, 0.0), Duration::from_millis(50));
        assert_eq!(b.delay_at(1, None, 0.5), Duration::from_millis(75));
        assert_eq!(b.delay_at(3, None, 0.0), Duration::from_millis(200));
        assert_eq!(b.delay_at(30, None, 0.0), Duration::from_millis(500));
        assert_eq!(
            b.delay_at(u32::MAX, None, 0.999),
            b.delay_at(30, None, 0.999)
        );
        for _ in 0..100 {
            let d = b.delay(2, None);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(200));
        }
        // A Retry-After longer than the backoff wins, up to its cap.
        assert_eq!(
            b.delay_at(1, Some(Duration::from_secs(2)), 0.0),
            Duration::from_secs(2)
        );
        assert_eq!(
            b.delay_at(1, Some(Duration::from_secs(3600)), 0.0),
            Duration::from_secs(5)
        );
        assert_eq!(
            b.delay_at(1, Some(Duration::ZERO), 0.0),
            Duration::from_millis(50)
        );
    }
}
