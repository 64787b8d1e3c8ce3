//! Retention: the change log keeps events for an age and a count per stream; older
//! ones (and their idempotency keys) are pruned, and forgotten by the cache too.

use std::time::Duration;

use chrono::Utc;

use super::{Service, ServiceError};

impl Service {
    /// Drops events past the retention window, and forgets them in the cache too, so a
    /// resume from before the window gets `reset` whether or not it hits the cache.
    pub async fn prune(
        &self,
        max_age: Duration,
        keep_per_stream: u64,
    ) -> Result<u64, ServiceError> {
        let age = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
        let cutoff = Utc::now()
            .checked_sub_signed(age)
            .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
        let deleted = self.store.prune(cutoff, keep_per_stream).await?;
        for stream in self.broker.cached_streams() {
            let b = self.store.bounds(&stream).await?;
            self.broker.forget_before(&stream, b.first_available());
        }
        Ok(deleted)
    }
}
