//! The demo zone a first run on an empty database gets.

use super::{Service, ServiceError};
use crate::domain::{NewItem, Principal, Zone};

impl Service {
    /// A demo zone with a handful of items, for a first run on an empty database.
    pub async fn seed_demo(&self) -> Result<Option<Zone>, ServiceError> {
        if self.store.zone_count().await? > 0 {
            return Ok(None);
        }
        let demo = Principal::system("demo");
        let zone = self.create_zone(&demo, "Demo warehouse").await?;
        for (sku, name, qty, low) in [
            ("BOLT-M6", "Bolts M6", 120, 20),
            ("NUT-M6", "Nuts M6", 200, 40),
            ("WSH-M6", "Washers M6", 90, 30),
            ("GLV-L", "Work gloves L", 12, 10),
            ("TAPE-50", "Packing tape 50 mm", 35, 8),
            ("LBL-A6", "Shipping labels A6", 500, 100),
        ] {
            let new = NewItem::parse(sku, name, qty, low)?;
            self.create_item(zone.id, new, None, &demo).await?;
        }
        Ok(Some(zone))
    }
}
