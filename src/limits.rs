//! Rate limits (governor): writes and connection opens per principal (per client IP
//! when anonymous), and messages per WebSocket connection. A limit of 0 is off.
//!
//! Keyed limiter state is pruned periodically (`prune`), so memory stays bounded by
//! the callers active in the last few seconds.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

/// A per-second rate and a burst; `rate == 0` turns the limit off.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    fn quota(self) -> Option<Quota> {
        let rate = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst.max(1)).unwrap_or(rate);
        Some(Quota::per_second(rate).allow_burst(burst))
    }
}

/// Over the limit: try again after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds for `Retry-After`, at least 1.
    pub fn seconds(self) -> u64 {
        self.0.as_secs_f64().ceil().max(1.0) as u64
    }

    pub fn millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX).max(1)
    }
}

pub struct Limits {
    writes: Option<DefaultKeyedRateLimiter<String>>,
    connects: Option<DefaultKeyedRateLimiter<String>>,
    ws_messages: Option<Quota>,
}

fn check(
    limiter: &Option<DefaultKeyedRateLimiter<String>>,
    key: &str,
    limit: &'static str,
) -> Result<(), RetryAfter> {
    let Some(l) = limiter else {
        return Ok(());
    };
    l.check_key(&key.to_owned()).map_err(|nu| {
        metrics::counter!("zonecast_rate_limited_total", "limit" => limit).increment(1);
        RetryAfter(nu.wait_time_from(DefaultClock::default().now()))
    })
}

impl Limits {
    pub fn new(writes: Rate, connects: Rate, ws_messages: Rate) -> Self {
        Limits {
            writes: writes.quota().map(DefaultKeyedRateLimiter::keyed),
            connects: connects.quota().map(DefaultKeyedRateLimiter::keyed),
            ws_messages: ws_messages.quota(),
        }
    }

    pub fn write(&self, key: &str) -> Result<(), RetryAfter> {
        check(&self.writes, key, "writes")
    }

    pub fn connect(&self, key: &str) -> Result<(), RetryAfter> {
        check(&self.connects, key, "connects")
    }

    /// A limiter for one WebSocket connection's messages.
    pub fn ws_messages(&self) -> Option<DefaultDirectRateLimiter> {
        self.ws_messages.map(DefaultDirectRateLimiter::direct)
    }

    /// Forgets callers whose limit has fully recovered.
    pub fn prune(&self) {
        for l in [&self.writes, &self.connects].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Callers currently tracked (for tests of the bound).
    pub fn tracked(&self) -> usize {
        [&self.writes, &self.connects]
            .into_iter()
            .flatten()
            .map(|l| l.len())
            .sum()
    }
}

/// Checks one message against a connection's limiter.
pub fn check_direct(l: &Option<DefaultDirectRateLimiter>) -> Result<(), RetryAfter> {
    match l {
        None => Ok(()),
        Some(l) => l.check().map_err(|nu| {
            metrics::counter!("zonecast_rate_limited_total", "limit" => "ws_messages").increment(1);
            RetryAfter(nu.wait_time_from(DefaultClock::default().now()))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_past_the_limit_is_refused_per_key() {
        let l = Limits::new(
            Rate {
                per_second: 1,
                burst: 2,
            },
            Rate {
                per_second: 0,
                burst: 0,
            },
            Rate {
                per_second: 0,
                burst: 0,
            },
        );
        assert!(l.write("a").is_ok() && l.write("a").is_ok());
        let r = l.write("a").expect_err("third is over");
        assert!(r.seconds() >= 1);
        assert!(l.write("b").is_ok(), "another key has its own budget");
        assert!(l.connect("a").is_ok(), "a limit of 0 is off");
        assert_eq!(l.tracked(), 2);
    }

    #[test]
    fn pruning_forgets_callers_whose_budget_has_recovered() {
        let fast = Rate {
            per_second: 1000,
            burst: 1,
        };
        let l = Limits::new(
            fast,
            fast,
            Rate {
                per_second: 0,
                burst: 0,
            },
        );
        for i in 0..100 {
            let _ = l.write(&format!("caller-{i}"));
        }
        assert_eq!(l.tracked(), 100);
        // At 1000/s a budget of 1 is back within a millisecond.
        std::thread::sleep(Duration::from_millis(20));
        l.prune();
        assert_eq!(l.tracked(), 0, "idle callers are forgotten");
    }
}
