//! Zones, items and the changes that may be made to them. "Parse, don't validate": a
//! `NewItem` or an `ItemPatch` exists only once its checks have passed (their fields
//! are private, `parse` is their only constructor), so the store and the transports
//! never re-check.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::DomainError;
use super::text::{non_negative, text};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub id: i32,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: i32,
    pub zone_id: i32,
    pub sku: String,
    pub name: String,
    pub quantity: i64,
    pub low_stock_threshold: i64,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

impl Item {
    pub fn is_low(&self) -> bool {
        self.quantity <= self.low_stock_threshold
    }
}

/// A consistent view of a zone: exactly the state after event `last_event_id`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub zone_id: i32,
    pub last_event_id: u64,
    pub items: Vec<Item>,
}

/// An item to create, checked.
#[derive(Debug, Clone)]
pub struct NewItem {
    sku: String,
    name: String,
    quantity: i64,
    low_stock_threshold: i64,
}

impl NewItem {
    pub fn sku(&self) -> &str {
        &self.sku
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn quantity(&self) -> i64 {
        self.quantity
    }

    pub fn low_stock_threshold(&self) -> i64 {
        self.low_stock_threshold
    }

    /// The canonical form, for idempotency fingerprints.
    pub fn canonical(&self) -> serde_json::Value {
        serde_json::json!([self.sku, self.name, self.quantity, self.low_stock_threshold])
    }

    pub fn parse(
        sku: &str,
        name: &str,
        quantity: i64,
        low_stock_threshold: i64,
    ) -> Result<Self, DomainError> {
        Ok(NewItem {
            sku: text("sku", sku, 64)?,
            name: text("name", name, 200)?,
            quantity: non_negative("quantity", quantity)?,
            low_stock_threshold: non_negative("low_stock_threshold", low_stock_threshold)?,
        })
    }
}

/// How a quantity changes: to an absolute value, or by a relative delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantityTarget {
    Absolute(i64),
    Delta(i64),
}

/// A change to one item: quantity and/or name/threshold, all applied in one event.
#[derive(Debug, Clone)]
pub struct ItemPatch {
    quantity: Option<QuantityTarget>,
    name: Option<String>,
    low_stock_threshold: Option<i64>,
    expected_version: Option<i64>,
    reason: Option<String>,
}

impl ItemPatch {
    pub fn parse(
        quantity: Option<i64>,
        delta: Option<i64>,
        name: Option<&str>,
        low_stock_threshold: Option<i64>,
        expected_version: Option<i64>,
        reason: Option<&str>,
    ) -> Result<Self, DomainError> {
        let quantity = match (quantity, delta) {
            (Some(_), Some(_)) => {
                return Err(DomainError::Invalid(
                    "give either quantity or delta, not both".into(),
                ));
            }
            (Some(q), None) => Some(QuantityTarget::Absolute(non_negative("quantity", q)?)),
            (None, Some(d)) => Some(QuantityTarget::Delta(d)),
            (None, None) => None,
        };
        let patch = ItemPatch {
            quantity,
            name: name.map(|n| text("name", n, 200)).transpose()?,
            low_stock_threshold: low_stock_threshold
                .map(|t| non_negative("low_stock_threshold", t))
                .transpose()?,
            expected_version,
            reason: reason.map(|r| text("reason", r, 500)).transpose()?,
        };
        if patch.quantity.is_none() && patch.name.is_none() && patch.low_stock_threshold.is_none() {
            return Err(DomainError::Invalid(
                "nothing to change: give quantity, delta, name or low_stock_threshold".into(),
            ));
        }
        Ok(patch)
    }

    /// Whether the patch changes the quantity (its event is `stock_updated`, else
    /// `item_updated`).
    pub fn changes_quantity(&self) -> bool {
        self.quantity.is_some()
    }

    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// The canonical form of the change, for idempotency fingerprints: the same change
    /// over REST or WebSocket gives the same text.
    pub fn canonical(&self) -> serde_json::Value {
        let (kind, value) = match self.quantity {
            None => ("none", 0),
            Some(QuantityTarget::Absolute(q)) => ("quantity", q),
            Some(QuantityTarget::Delta(d)) => ("delta", d),
        };
        serde_json::json!([
            kind,
            value,
            self.name,
            self.low_stock_threshold,
            self.expected_version,
            self.reason
        ])
    }

    /// Applies the patch to `item`, returning the new state; refuses a stale
    /// `expected_version` and a quantity below zero.
    pub fn apply(&self, item: &Item, at: DateTime<Utc>) -> Result<Item, DomainError> {
        if let Some(expected) = self.expected_version
            && expected != item.version
        {
            return Err(DomainError::VersionConflict {
                expected,
                actual: item.version,
            });
        }
        let quantity = match self.quantity {
            None => item.quantity,
            Some(QuantityTarget::Absolute(q)) => q,
            Some(QuantityTarget::Delta(d)) => {
                let would_be = item
                    .quantity
                    .checked_add(d)
                    .ok_or_else(|| DomainError::Invalid("delta overflows the quantity".into()))?;
                if would_be < 0 {
                    return Err(DomainError::InsufficientStock {
                        quantity: item.quantity,
                        would_be,
                    });
                }
                would_be
            }
        };
        let version = item
            .version
            .checked_add(1)
            .ok_or_else(|| DomainError::Invalid("the item's version cannot grow".into()))?;
        Ok(Item {
            quantity,
            name: self.name.clone().unwrap_or_else(|| item.name.clone()),
            low_stock_threshold: self.low_stock_threshold.unwrap_or(item.low_stock_threshold),
            version,
            updated_at: at,
            ..item.clone()
        })
    }
}

/// The `data` of the zone stream's item events. It carries the whole item, so a
/// repeated idempotency key can answer with exactly the original result, rebuilt from
/// the logged event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ItemEventData {
    pub item_id: i32,
    pub zone_id: i32,
    pub sku: String,
    pub name: String,
    pub quantity: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_quantity: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<i64>,
    pub version: i64,
    pub low_stock_threshold: i64,
    pub low_stock: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub actor: String,
}

impl ItemEventData {
    pub fn new(item: &Item, previous: Option<&Item>, reason: Option<String>, actor: &str) -> Self {
        ItemEventData {
            item_id: item.id,
            zone_id: item.zone_id,
            sku: item.sku.clone(),
            name: item.name.clone(),
            quantity: item.quantity,
            previous_quantity: previous.map(|p| p.quantity),
            delta: previous.map(|p| item.quantity - p.quantity),
            version: item.version,
            low_stock_threshold: item.low_stock_threshold,
            low_stock: item.is_low(),
            reason,
            actor: actor.to_owned(),
        }
    }

    pub fn item(&self, at: DateTime<Utc>) -> Item {
        Item {
            id: self.item_id,
            zone_id: self.zone_id,
            sku: self.sku.clone(),
            name: self.name.clone(),
            quantity: self.quantity,
            low_stock_threshold: self.low_stock_threshold,
            version: self.version,
            updated_at: at,
        }
    }
}

/// `data` of a `low_stock_alert` on the alerts stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LowStockData {
    pub zone_id: i32,
    pub item_id: i32,
    pub sku: String,
    pub name: String,
    pub quantity: i64,
    pub low_stock_threshold: i64,
    pub zone_event_id: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::now;

    fn item(q: i64) -> Item {
        Item {
            id: 1,
            zone_id: 1,
            sku: "A".into(),
            name: "a".into(),
            quantity: q,
            low_stock_threshold: 2,
            version: 3,
            updated_at: now(),
        }
    }

    #[test]
    fn delta_below_zero_is_insufficient_stock() {
        let p = ItemPatch::parse(None, Some(-5), None, None, None, None).unwrap();
        assert_eq!(
            p.apply(&item(4), now()),
            Err(DomainError::InsufficientStock {
                quantity: 4,
                would_be: -1
            })
        );
    }

    #[test]
    fn stale_expected_version_is_a_conflict() {
        let p = ItemPatch::parse(Some(1), None, None, None, Some(2), None).unwrap();
        assert!(matches!(
            p.apply(&item(4), now()),
            Err(DomainError::VersionConflict { .. })
        ));
        let p = ItemPatch::parse(Some(1), None, None, None, Some(3), None).unwrap();
        let next = p.apply(&item(4), now()).unwrap();
        assert_eq!((next.quantity, next.version), (1, 4));
    }

    #[test]
    fn quantity_and_delta_together_are_refused() {
        assert!(ItemPatch::parse(Some(1), Some(1), None, None, None, None).is_err());
        assert!(ItemPatch::parse(None, None, None, None, None, None).is_err());
        assert!(ItemPatch::parse(Some(-1), None, None, None, None, None).is_err());
    }

    proptest::proptest! {
        /// Whatever a client sends, parsing and applying a change never panics, and
        /// refuses only with the documented errors.
        #[test]
        fn any_patch_is_applied_or_refused_with_a_defined_error(
            quantity in proptest::option::of(proptest::num::i64::ANY),
            delta in proptest::option::of(proptest::num::i64::ANY),
            name in proptest::option::of(".{0,260}"),
            threshold in proptest::option::of(proptest::num::i64::ANY),
            expected in proptest::option::of(proptest::num::i64::ANY),
            reason in proptest::option::of(".{0,600}"),
            q0 in 0i64..=i64::MAX,
            v0 in proptest::num::i64::ANY,
        ) {
            match ItemPatch::parse(quantity, delta, name.as_deref(), threshold, expected, reason.as_deref()) {
                Err(e) => proptest::prop_assert!(matches!(e, DomainError::Invalid(_)), "{e:?}"),
                Ok(p) => {
                    let mut it = item(q0);
                    it.version = v0;
                    match p.apply(&it, now()) {
                        Ok(next) => {
                            proptest::prop_assert!(next.quantity >= 0);
                            proptest::prop_assert_eq!(next.version, v0 + 1);
                        }
                        Err(e) => proptest::prop_assert!(matches!(e,
                            DomainError::Invalid(_) | DomainError::VersionConflict { .. }
                                | DomainError::InsufficientStock { .. }), "{e:?}"),
                    }
                }
            }
        }
    }
}
