//! Why a request was refused, in domain terms. Transports map each variant to their
//! own wire form (problem+json status, WS error code) in one place each.

/// A refusal: nothing was applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DomainError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Invalid(String),
    #[error("expected version {expected} but the item is at version {actual}")]
    VersionConflict { expected: i64, actual: i64 },
    #[error("quantity would become {would_be}; stock cannot go below zero")]
    InsufficientStock { quantity: i64, would_be: i64 },
    #[error("{0}")]
    Conflict(String),
    /// An idempotency key this principal already used for a different request.
    #[error("idempotency key {0:?} was already used for a different request; use a new key")]
    IdempotencyKeyReused(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
}
