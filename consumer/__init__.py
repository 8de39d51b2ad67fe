"""The order service: inbound events -> ORM writes + outbox rows, one transaction per batch."""
