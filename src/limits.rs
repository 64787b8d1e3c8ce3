//! Rate limits (governor): writes and connection opens per principal (per client IP
//! when anonymous), failed authentications per client IP, and messages per WebSocket
//! connection. A limit of 0 is off.
//!
//! Keyed limiter state is pruned periodically (`prune`), so memory stays bounded by
//! the callers active in the last few seconds; and each limiter tracks at most
//! `MAX_TRACKED` callers at once: past that (a flood from many addresses) it prunes at
//! once, and refuses new callers while it is still full.
//!
//! Every limiter shares the one clock made in `Limits::new`. A governor limiter built
//! without a clock makes its own (`quanta::Clock::new`), which asks the CPU whether
//! its counter is usable with a series of CPUID instructions: 14 µs on this VM, where
//! each one exits to the hypervisor. Every WebSocket connection paid that for its
//! message limiter, and every refused request paid it again to say when to retry.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

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

/// Callers one keyed limiter tracks at most (about 100 bytes each).
pub const MAX_TRACKED: usize = 100_000;

pub struct Limits {
    writes: Option<Keyed>,
    connects: Option<Keyed>,
    auth_failures: Option<Keyed>,
    ws_messages: Option<Quota>,
    clock: DefaultClock,
}

/// A keyed limiter and when it was last pruned because it was full.
struct Keyed {
    limiter: DefaultKeyedRateLimiter<String>,
    pruned_at: std::sync::Mutex<std::time::Instant>,
}

impl Keyed {
    fn new(q: Quota, clock: &DefaultClock) -> Self {
        Keyed {
            limiter: RateLimiter::dashmap_with_clock(q, clock.clone()),
            pruned_at: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    /// At its bound even after pruning: a flood of distinct callers. Pruning scans
    /// every caller, so it runs at most every 100 ms, not on every check.
    fn full(&self) -> bool {
        if self.limiter.len() < MAX_TRACKED {
            return false;
        }
        let mut at = self.pruned_at.lock().unwrap_or_else(|e| e.into_inner());
        if at.elapsed() >= Duration::from_millis(100) {
            self.limiter.retain_recent();
            *at = std::time::Instant::now();
        }
        self.limiter.len() >= MAX_TRACKED
    }
}

fn check(limiter: &Option<Keyed>, key: &str, limit: &'static str) -> Result<(), RetryAfter> {
    let Some(l) = limiter else {
        return Ok(());
    };
    if l.full() {
        // Everyone waits a moment rather than the state growing without bound.
        metrics::counter!("zonecast_rate_limited_total", "limit" => limit).increment(1);
        return Err(RetryAfter(Duration::from_secs(1)));
    }
    l.limiter.check_key(&key.to_owned()).map_err(|nu| {
        metrics::counter!("zonecast_rate_limited_total", "limit" => limit).increment(1);
        RetryAfter(nu.wait_time_from(l.limiter.clock().now()))
    })
}

/// The rates of one server's limits.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    pub writes: Rate,
    pub connects: Rate,
    pub auth_failures: Rate,
    pub ws_messages: Rate,
}

impl Limits {
    pub fn new(r: Rates) -> Self {
        let clock = DefaultClock::default();
        let keyed = |rate: Rate| rate.quota().map(|q| Keyed::new(q, &clock));
        Limits {
            writes: keyed(r.writes),
            connects: keyed(r.connects),
            auth_failures: keyed(r.auth_failures),
            ws_messages: r.ws_messages.quota(),
            clock,
        }
    }

    /// One failed authentication from `ip`.
    pub fn auth_failure(&self, ip: &str) -> Result<(), RetryAfter> {
        check(&self.auth_failures, ip, "auth_failures")
    }

    pub fn write(&self, key: &str) -> Result<(), RetryAfter> {
        check(&self.writes, key, "writes")
    }

    pub fn connect(&self, key: &str) -> Result<(), RetryAfter> {
        check(&self.connects, key, "connects")
    }

    /// A limiter for one WebSocket connection's messages.
    pub fn ws_messages(&self) -> Option<DefaultDirectRateLimiter> {
        self.ws_messages
            .map(|q| RateLimiter::direct_with_clock(q, self.clock.clone()))
    }

    /// Forgets callers whose limit has fully recovered.
    pub fn prune(&self) {
        for l in [&self.writes, &self.connects, &self.auth_failures]
            .into_iter()
            .flatten()
        {
            l.limiter.retain_recent();
            l.limiter.shrink_to_fit();
        }
    }

    /// Callers currently tracked (for tests of the bound).
    pub fn tracked(&self) -> usize {
        [&self.writes, &self.connects, &self.auth_failures]
            .into_iter()
            .flatten()
            .map(|l| l.limiter.len())
            .sum()
    }
}

/// Checks one message against a connection's limiter.
pub fn check_direct(l: &Option<DefaultDirectRateLimiter>) -> Result<(), RetryAfter> {
    match l {
        None => Ok(()),
        Some(l) => l.check().map_err(|nu| {
            metrics::counter!("zonecast_rate_limited_total", "limit" => "ws_messages").increment(1);
            RetryAfter(nu.wait_time_from(l.clock().now()))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFF: Rate = Rate {
        per_second: 0,
        burst: 0,
    };

    fn limits(writes: Rate, connects: Rate) -> Limits {
        Limits::new(Rates {
            writes,
            connects,
            auth_failures: OFF,
            ws_messages: OFF,
        })
    }

    /// Connections share the limits' clock, never a budget: one connection's burst
    /// leaves the next one's whole, and a refusal says when to retry.
    #[test]
    fn each_connection_has_its_own_message_budget() {
        let l = Limits::new(Rates {
            writes: OFF,
            connects: OFF,
            auth_failures: OFF,
            ws_messages: Rate {
                per_second: 1,
                burst: 3,
            },
        });
        let first = l.ws_messages();
        assert!(first.is_some());
        for _ in 0..3 {
            assert_eq!(check_direct(&first), Ok(()));
        }
        let refused = check_direct(&first).expect_err("past the burst");
        assert!(refused.0 > Duration::ZERO && refused.0 <= Duration::from_secs(1));
        let second = l.ws_messages();
        for _ in 0..3 {
            assert_eq!(check_direct(&second), Ok(()));
        }
        assert!(check_direct(&second).is_err());
    }

    #[test]
    fn a_burst_past_the_limit_is_refused_per_key() {
        let l = limits(
            Rate {
                per_second: 1,
                burst: 2,
            },
            OFF,
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
        let l = limits(fast, fast);
        for i in 0..100 {
            let _ = l.write(&format!("caller-{i}"));
        }
        assert_eq!(l.tracked(), 100);
        // At 1000/s a budget of 1 is back within a millisecond.
        std::thread::sleep(Duration::from_millis(20));
        l.prune();
        assert_eq!(l.tracked(), 0, "idle callers are forgotten");
    }

    #[test]
    fn a_limiter_never_tracks_more_than_its_bound() {
        let slow = Rate {
            per_second: 1,
            burst: 1,
        };
        let l = limits(slow, OFF);
        let mut refused = 0;
        for i in 0..MAX_TRACKED + 500 {
            if l.write(&format!("ip:{i}")).is_err() {
                refused += 1;
            }
        }
        assert!(l.tracked() <= MAX_TRACKED, "{}", l.tracked());
        assert_eq!(refused, 500, "callers past the bound wait their turn");
    }
}
