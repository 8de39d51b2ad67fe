"""The order service's tables: customers, orders, order lines, the inbox, parked events,
consumer offsets.

Relationships are ``lazy="raise"``: touching one that the query did not eager-load is an
immediate, clear error in tests, never a ``MissingGreenlet`` at run time.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from consumer.state_machine import OrderStatus


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    email: Mapped[str] = mapped_column(Text, unique=True)
    name: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    orders: Mapped[list[Order]] = relationship(back_populates="customer", lazy="raise")


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    customer_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("customers.id"))
    status: Mapped[str] = mapped_column(Text)
    currency: Mapped[str] = mapped_column(String(3))
    total: Mapped[Decimal] = mapped_column(Numeric)
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    customer: Mapped[Customer] = relationship(back_populates="orders", lazy="raise")
    lines: Mapped[list[OrderLine]] = relationship(
        back_populates="order",
        lazy="raise",
        order_by="OrderLine.position",
        cascade="all, delete-orphan",
    )

    __table_args__ = (
        CheckConstraint(
            "status IN ({})".format(", ".join(f"'{status.value}'" for status in OrderStatus)),
            name="ck_orders_status",
        ),
        CheckConstraint("version >= 1", name="ck_orders_version"),
        CheckConstraint("total >= 0", name="ck_orders_total"),
        # Keyset pagination of the read API, newest first, per filter (migration 0002).
        # The customer one also serves the foreign key.
        Index("ix_orders_created_at_id", "created_at", "id"),
        Index("ix_orders_status_created_at_id", "status", "created_at", "id"),
        Index("ix_orders_customer_id_created_at_id", "customer_id", "created_at", "id"),
    )


class OrderLine(Base):
    __tablename__ = "order_lines"

    order_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("orders.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    sku: Mapped[str] = mapped_column(Text)
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price: Mapped[Decimal] = mapped_column(Numeric)

    order: Mapped[Order] = relationship(back_populates="lines", lazy="raise")

    __table_args__ = (
        CheckConstraint("quantity >= 1", name="ck_order_lines_quantity"),
        CheckConstraint("unit_price >= 0", name="ck_order_lines_unit_price"),
    )


class ProcessedEvent(Base):
    """The inbox: one row per applied inbound event; its primary key is what drops repeats."""

    __tablename__ = "processed_events"

    event_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    order_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    event_type: Mapped[str] = mapped_column(Text)
    topic: Mapped[str] = mapped_column(Text)
    partition: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)
    processed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class ParkedEvent(Base):
    """An inbound event that cannot apply yet, waiting for an earlier event of its order.

    ``id`` is the arrival order; the key and value are the original bytes (for the dead
    letter, should it never apply); ``reason`` and ``message`` say why it waits.
    """

    __tablename__ = "parked_events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    event_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    order_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    event_type: Mapped[str] = mapped_column(Text)
    group_id: Mapped[str] = mapped_column(Text)
    topic: Mapped[str] = mapped_column(Text)
    partition: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)
    key: Mapped[bytes | None] = mapped_column(LargeBinary)
    value: Mapped[bytes | None] = mapped_column(LargeBinary)
    reason: Mapped[str] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)
    #: The W3C trace context it came with, carried on to what it becomes.
    traceparent: Mapped[str | None] = mapped_column(Text)
    tracestate: Mapped[str | None] = mapped_column(Text)
    parked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        UniqueConstraint("event_id", name="uq_parked_events_event_id"),
        Index("ix_parked_events_order_id", "order_id"),
        Index("ix_parked_events_partition", "group_id", "topic", "partition", "parked_at"),
    )


class ConsumerOffset(Base):
    """The next offset to read per (group, topic, partition).

    This is the truth; the copy committed to Kafka only feeds lag tools.
    """

    __tablename__ = "consumer_offsets"

    group_id: Mapped[str] = mapped_column(Text, primary_key=True)
    topic: Mapped[str] = mapped_column(Text, primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_offset: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
