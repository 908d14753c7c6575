//! The laptop's message when a caller of an intercepted service finds nothing on the laptop
//! port: the first one at once, then at most one line every few seconds that counts the
//! calls since, so a client retrying against a stopped laptop process (or a load test) does
//! not flood the terminal the intercept runs in.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a refused call is reported while refusals keep coming.
pub const EVERY: Duration = Duration::from_secs(5);

struct Refusals {
    last: Option<Instant>,
    /// Refused calls not reported since `last`.
    unreported: u64,
}

impl Refusals {
    const fn new() -> Self {
        Refusals {
            last: None,
            unreported: 0,
        }
    }

    /// Counts one refused call at `now`; returns how many calls the line to print now covers
    /// (this one included), or None when it is too soon after the last line.
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.unreported += 1;
        if self.last.is_some_and(|t| now.duration_since(t) < EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

static REFUSALS: Mutex<Refusals> = Mutex::new(Refusals::new());

/// Reports a call to `service:remote` that found nothing on laptop port `local`.
pub fn report(service: &str, remote: u16, local: u16, error: &std::io::Error) {
    let covered = REFUSALS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .note(Instant::now());
    match covered {
        Some(1) => eprintln!("devloop: a call to {service}:{remote} found nothing on laptop port {local} ({error})"),
        Some(n) => eprintln!(
            "devloop: {n} calls to {service} found nothing on the laptop in the last {} s; the latest to port {local} ({error})",
            EVERY.as_secs()
        ),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_refusal_is_reported_then_one_line_per_period_counts_the_rest() {
        let mut r = Refusals::new();
        let t0 = Instant::now();
        assert_eq!(r.note(t0), Some(1));
        for i in 1..=9 {
            assert_eq!(r.note(t0 + Duration::from_millis(i * 100)), None);
        }
        // The next one after the period covers the nine held back and itself.
        assert_eq!(r.note(t0 + EVERY + Duration::from_millis(1)), Some(10));
        // A refusal long after the last line is reported on its own.
        assert_eq!(r.note(t0 + EVERY * 10), Some(1));
    }
}
