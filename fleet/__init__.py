"""npcapfleet: a fleet of sensors searched as one, through a ClickHouse flow catalogue and
the sensors' HTTPS APIs (docs/FLEET.md)."""
