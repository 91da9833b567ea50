"""kimi-fleet domain logic: stack spec, catalog, sizing, rendering. No Pulumi imports here."""
