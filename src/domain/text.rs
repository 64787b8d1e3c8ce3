//! Checks on free text and numbers that every parsed type shares: trimmed, not empty,
//! bounded; non-negative.

use super::DomainError;

/// `value` trimmed, refused when empty or longer than `max` characters.
pub(crate) fn text(field: &str, value: &str, max: usize) -> Result<String, DomainError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(DomainError::Invalid(format!("{field} must not be empty")));
    }
    if v.chars().count() > max {
        return Err(DomainError::Invalid(format!(
            "{field} must be at most {max} characters"
        )));
    }
    Ok(v.to_owned())
}

pub(crate) fn non_negative(field: &str, v: i64) -> Result<i64, DomainError> {
    if v < 0 {
        return Err(DomainError::Invalid(format!("{field} must be >= 0")));
    }
    Ok(v)
}

/// An API key's name: letters, digits, `-`, `_`, `.`.
pub fn key_name(name: &str) -> Result<String, DomainError> {
    let n = text("name", name, 64)?;
    if !n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(DomainError::Invalid(
            "a key name may hold letters, digits, '-', '_' and '.'".into(),
        ));
    }
    Ok(n)
}

pub fn user_id(user: &str) -> Result<String, DomainError> {
    text("user", user, 128)
}

pub fn zone_name(name: &str) -> Result<String, DomainError> {
    text("name", name, 200)
}

/// An idempotency key (`Idempotency-Key` header, WS `request_id`).
pub fn request_id(key: Option<&str>) -> Result<Option<String>, DomainError> {
    key.map(|k| text("idempotency key", k, 200)).transpose()
}
