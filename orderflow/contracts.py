"""The published contract as files: JSON Schemas, the AsyncAPI document, the field-limit table.

Everything here is generated from the code's own models, so the files cannot say one
thing while the consumer does another:

- inbound events from the ``msgspec`` structs the consumer decodes with
  (:mod:`consumer.events`), with the few rules the consumer checks by hand (the
  ``event_type`` and ``schema_version`` values, a time zone on ``occurred_at``, the money
  format) written into the schema as well;
- ``OrderUpdated`` from :class:`OrderUpdated` below, a struct that mirrors what
  :func:`consumer.updates.build_update` writes (a test proves that real updates decode
  into it and validate against the schema);
- the dead-letter reasons from :class:`consumer.errors.DeadLetterReason`.

``orderflow schemas write`` regenerates the files; ``orderflow schemas write --check``
(run by the test suite) fails when the checked-in files differ from the code.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec

from consumer.errors import DeadLetterReason
from consumer.events import (
    MONEY_MAX_INTEGER_DIGITS,
    MONEY_MAX_SCALE,
    PAYLOAD_TYPES,
    SCHEMA_VERSION,
    Envelope,
    EventType,
)
from consumer.parking import PARKED_MS_HEADER
from consumer.state_machine import OrderStatus
from consumer.updates import SNAPSHOT_CHANGE, UPDATE_EVENT_TYPE
from orderflow.runtime.settings import Settings

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
SCHEMAS_DIRECTORY: Final = "schemas"
ASYNCAPI_PATH: Final = "docs/asyncapi.yaml"
EVENTS_DOC_PATH: Final = "docs/events.md"
WRITE_COMMAND: Final = "orderflow schemas write"
GENERATED_NOTE: Final = (
    f"Generated from the code's models by `{WRITE_COMMAND}`: edit the code, not this file."
)
#: The generated part of docs/events.md sits between these two lines.
LIMITS_BEGIN: Final = "<!-- generated: field limits (orderflow schemas write) -->"
LIMITS_END: Final = "<!-- end of generated field limits -->"

#: RFC 3339 with a time zone, as the consumer requires (it rejects a time without one).
TIMESTAMP_PATTERN: Final = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
#: A money string the consumer accepts, in the plain notation upstream should send.
INBOUND_MONEY_PATTERN: Final = (
    rf"^[0-9]{{1,{MONEY_MAX_INTEGER_DIGITS}}}(\.[0-9]{{1,{MONEY_MAX_SCALE}}})?$"
)
#: Money as orderflow writes it: plain decimal notation, never an exponent.
OUTBOUND_MONEY_PATTERN: Final = r"^[0-9]+(\.[0-9]+)?$"


# --------------------------------------------------------------------------------------
# OrderUpdated: the outbound message, as a struct (consumer/updates.py builds it as a dict)
# --------------------------------------------------------------------------------------

Money = Annotated[
    Decimal,
    msgspec.Meta(
        description='Money in plain decimal notation with the scale it was given, e.g. "25.00".',
        examples=["25.00"],
    ),
]
Timestamp = Annotated[
    datetime,
    msgspec.Meta(
        tz=True,
        description="RFC 3339 in UTC with microseconds and a Z.",
        examples=["2026-11-24T10:15:00.123456Z"],
    ),
]
KNOWN_CHANGES: Final = (*(event_type.value for event_type in EventType), SNAPSHOT_CHANGE)


def _described(description: str) -> msgspec.Meta:
    return msgspec.Meta(description=description)


class UpdatedCustomer(msgspec.Struct, frozen=True):
    """The order's customer."""

    email: str
    name: str


class UpdatedLine(msgspec.Struct, frozen=True):
    """One order line."""

    sku: str
    quantity: Annotated[int, msgspec.Meta(ge=1)]
    unit_price: Money


class UpdatedOrder(msgspec.Struct, frozen=True):
    """The order's whole state as of order_version."""

    id: uuid.UUID
    status: Annotated[
        OrderStatus,
        _described(
            "pending -> paid -> shipped -> delivered; pending or paid -> cancelled. "
            "delivered and cancelled are final."
        ),
    ]
    currency: Annotated[
        str, msgspec.Meta(pattern="^[A-Z]{3}$", description="ISO 4217, three capital letters.")
    ]
    total: Annotated[Money, _described("The sum of quantity x unit_price over the lines.")]
    customer: UpdatedCustomer
    lines: tuple[UpdatedLine, ...]
    created_at: Timestamp
    updated_at: Timestamp


class OrderUpdated(msgspec.Struct, frozen=True):
    """One applied change of one order, carrying the order's whole state (see ``DESCRIPTION``).

    Decoding with this struct ignores unknown fields, as a subscriber should.
    """

    DESCRIPTION: ClassVar[str] = (
        "One applied change of one order, carrying the order's whole state, on the outbound "
        "topic (orders.updates), keyed by order_id. Keep the latest order_version of each "
        "order: an order's versions arrive in increasing order, at least once (a repeat has "
        "the same event_id). Backfill snapshots have the same shape, with change Snapshot "
        "and causation_id null. Unknown fields may be added: ignore them."
    )

    event_id: Annotated[
        uuid.UUID,
        _described(
            "Unique per update, and the same when the update is delivered again: drop "
            "repeats by it."
        ),
    ]
    event_type: Annotated[Literal["OrderUpdated"], _described("Always OrderUpdated.")]
    schema_version: Annotated[
        Literal[1], _described("1. A breaking change would come as a new version.")
    ]
    occurred_at: Annotated[Timestamp, _described("When orderflow applied the change (UTC).")]
    causation_id: Annotated[
        uuid.UUID | None,
        _described("The event_id of the inbound event that caused it; null for a Snapshot."),
    ]
    order_id: Annotated[uuid.UUID, _described("The order; also the Kafka message key.")]
    order_version: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            description="1 after OrderPlaced, then exactly 1 more with each applied event.",
        ),
    ]
    change: Annotated[
        str,
        msgspec.Meta(
            description=(
                "What changed: the inbound event type that was applied, or Snapshot for a "
                "backfill of the current state (same order_version as the last update). "
                "New inbound event types add values: treat an unknown one like any other."
            ),
            examples=list(KNOWN_CHANGES),
        ),
    ]
    order: UpdatedOrder


# --------------------------------------------------------------------------------------
# Schema generation
# --------------------------------------------------------------------------------------

#: Descriptions of inbound fields (the structs in consumer/events.py carry none). A name
#: that no longer exists in the models is an error, so this table cannot go stale.
_INBOUND_DESCRIPTIONS: Final[dict[str, dict[str, str]]] = {
    "Envelope": {
        "event_id": (
            "Unique per event. Sending the same event again (a retry) is safe: a repeated "
            "event_id is skipped."
        ),
        "event_type": "What happened; decides the payload's shape.",
        "schema_version": f"Always {SCHEMA_VERSION}; any other value is dead-lettered.",
        "occurred_at": "When it happened upstream: RFC 3339 with a time zone.",
        "order_id": "The order; also the Kafka message key (as text).",
        "payload": "The event type's data.",
    },
    "Customer": {"email": "Customers are upserted by email.", "name": "The customer's name."},
    "Line": {
        "sku": "The product.",
        "quantity": "Units ordered.",
        "unit_price": "Price of one unit, in the order's currency.",
    },
    "OrderPlaced": {
        "currency": "ISO 4217, three capital letters.",
        "lines": "What was ordered; the total is the sum of quantity x unit_price.",
    },
    "OrderPaid": {
        "payment_id": "The payment's id upstream.",
        "amount": "Must equal the order total, or the event is dead-lettered (amount_mismatch).",
    },
    "OrderShipped": {"carrier": "Who carries it.", "tracking_number": "The carrier's number."},
    "OrderCancelled": {"reason": "Why it was cancelled (may be empty)."},
}
_TRANSITIONS: Final[dict[EventType, str]] = {
    EventType.ORDER_PLACED: ("Creates the order (status pending); upserts the customer by email."),
    EventType.ORDER_PAID: "pending -> paid; amount must equal the order total.",
    EventType.ORDER_SHIPPED: "paid -> shipped.",
    EventType.ORDER_DELIVERED: "shipped -> delivered (final). The payload is an empty object.",
    EventType.ORDER_CANCELLED: "pending or paid -> cancelled (final).",
}


def _inbound_money() -> dict[str, Any]:
    return {
        "description": (
            'Money: a JSON string (recommended, e.g. "12.50") or a JSON number; not '
            f"negative, at most {MONEY_MAX_SCALE} decimal places, below "
            f"10^{MONEY_MAX_INTEGER_DIGITS}. Decoded exactly from the JSON text, never "
            "through binary floating point. (The decimal places of a JSON number are "
            "checked by the consumer: a JSON Schema cannot express them exactly.)"
        ),
        "anyOf": [
            {"type": "string", "pattern": INBOUND_MONEY_PATTERN},
            {"type": "number", "minimum": 0, "exclusiveMaximum": 10**MONEY_MAX_INTEGER_DIGITS},
        ],
    }


def _outbound_money(original: Mapping[str, Any]) -> dict[str, Any]:
    schema = {key: value for key, value in original.items() if key != "format"}
    schema["pattern"] = OUTBOUND_MONEY_PATTERN
    return schema


def _is_decimal(node: Mapping[str, Any]) -> bool:
    return node.get("type") == "string" and node.get("format") == "decimal"


def _map_nodes(node: Any, replace: Callable[[dict[str, Any]], dict[str, Any] | None]) -> Any:
    """A copy of ``node`` where ``replace`` may swap any object (schema) for another."""
    if isinstance(node, dict):
        swapped = replace(node)
        if swapped is not None:
            return swapped
        return {key: _map_nodes(value, replace) for key, value in node.items()}
    if isinstance(node, list):
        return [_map_nodes(value, replace) for value in node]
    return node


def _rename_definitions(definitions: dict[str, Any], renames: Mapping[str, str]) -> dict[str, Any]:
    def replace(node: dict[str, Any]) -> dict[str, Any] | None:
        reference = node.get("$ref")
        if isinstance(reference, str) and reference.startswith("#/$defs/"):
            name = reference.removeprefix("#/$defs/")
            return {**node, "$ref": f"#/$defs/{renames.get(name, name)}"}
        return None

    return {
        renames.get(name, name): _map_nodes(body, replace) for name, body in definitions.items()
    }


def _describe(definitions: dict[str, Any]) -> None:
    for name, descriptions in _INBOUND_DESCRIPTIONS.items():
        if name not in definitions:
            raise RuntimeError(f"contracts: no model {name!r} to describe; update contracts.py")
        properties = definitions[name]["properties"]
        for field_name, text in descriptions.items():
            if field_name not in properties:
                raise RuntimeError(
                    f"contracts: {name} has no field {field_name!r}; update contracts.py"
                )
            properties[field_name] = {"description": text, **properties[field_name]}


def _inbound_definitions() -> dict[str, Any]:
    """Every inbound struct's schema, payload structs named ``<EventType>Payload``."""
    _, definitions = msgspec.json.schema_components(
        [Envelope, *PAYLOAD_TYPES.values()], ref_template="#/$defs/{name}"
    )
    definitions = copy.deepcopy(definitions)
    _describe(definitions)
    definitions = _map_nodes(
        definitions, lambda node: _inbound_money() if _is_decimal(node) else None
    )
    renames = {payload.__name__: f"{payload.__name__}Payload" for payload in PAYLOAD_TYPES.values()}
    for payload in PAYLOAD_TYPES.values():
        definitions[payload.__name__]["title"] = f"{payload.__name__} payload"
    return _rename_definitions(definitions, renames)


def _referenced(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        reference = node.get("$ref")
        if isinstance(reference, str) and reference.startswith("#/$defs/"):
            yield reference.removeprefix("#/$defs/")
        for value in node.values():
            yield from _referenced(value)
    elif isinstance(node, list):
        for value in node:
            yield from _referenced(value)


def _closure(root: Any, definitions: Mapping[str, Any]) -> dict[str, Any]:
    """The definitions ``root`` needs, in the models' order."""
    needed: set[str] = set()
    pending = list(_referenced(root))
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending.extend(_referenced(definitions[name]))
    return {name: body for name, body in definitions.items() if name in needed}


def _envelope_properties(
    definitions: Mapping[str, Any], *, event_type: dict[str, Any], payload: dict[str, Any]
) -> dict[str, Any]:
    properties: dict[str, Any] = copy.deepcopy(definitions["Envelope"]["properties"])
    properties["event_type"] = {
        "description": properties["event_type"]["description"],
        **event_type,
    }
    properties["schema_version"] = {
        "description": properties["schema_version"]["description"],
        "const": SCHEMA_VERSION,
    }
    properties["occurred_at"] = {
        **properties["occurred_at"],
        "format": "date-time",
        "pattern": TIMESTAMP_PATTERN,
    }
    properties["payload"] = {"description": properties["payload"]["description"], **payload}
    return properties


def _document(
    title: str, description: str, body: dict[str, Any], definitions: Mapping[str, Any]
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "$schema": JSON_SCHEMA_DIALECT,
        "$comment": GENERATED_NOTE,
        "title": title,
        "description": description,
        **body,
    }
    needed = _closure(body, definitions)
    if needed:
        document["$defs"] = needed
    return document


def envelope_schema() -> dict[str, Any]:
    """What every inbound event has in common (the payload checked per event type)."""
    definitions = _inbound_definitions()
    envelope = definitions["Envelope"]
    properties = _envelope_properties(
        definitions,
        event_type={"enum": [event_type.value for event_type in EventType]},
        payload={"type": "object"},
    )
    return _document(
        "Inbound event envelope",
        "The fields every event on the inbound topic (orders.events) carries. Key: the "
        "order_id as UTF-8 text. Value: this object as UTF-8 JSON. Unknown fields are "
        "ignored at every level. An unknown event_type is dead-lettered (unknown_event_type).",
        {"type": "object", "properties": properties, "required": envelope["required"]},
        {},
    )


def inbound_event_schema(event_type: EventType) -> dict[str, Any]:
    """One inbound event type: the envelope with that type's payload."""
    definitions = _inbound_definitions()
    payload_name = f"{PAYLOAD_TYPES[event_type].__name__}Payload"
    properties = _envelope_properties(
        definitions,
        event_type={"const": event_type.value},
        payload={"$ref": f"#/$defs/{payload_name}"},
    )
    return _document(
        event_type.value,
        f"{_TRANSITIONS[event_type]} Published by upstream to the inbound topic "
        "(orders.events), keyed by order_id. Unknown fields are ignored at every level.",
        {
            "type": "object",
            "properties": properties,
            "required": definitions["Envelope"]["required"],
        },
        definitions,
    )


def order_updated_schema() -> dict[str, Any]:
    """The outbound ``OrderUpdated`` (also the shape of backfill snapshots)."""
    _, definitions = msgspec.json.schema_components([OrderUpdated], ref_template="#/$defs/{name}")
    definitions = _map_nodes(
        copy.deepcopy(definitions),
        lambda node: _outbound_money(node) if _is_decimal(node) else None,
    )
    body = dict(definitions.pop("OrderUpdated"))
    body.pop("description", None)
    body.pop("title", None)
    body["properties"] = _map_nodes(body["properties"], _single_value_as_const)
    for name in ("occurred_at", "created_at", "updated_at"):
        for holder in (body, definitions["UpdatedOrder"]):
            if name in holder["properties"]:
                holder["properties"][name] = {
                    **holder["properties"][name],
                    "pattern": TIMESTAMP_PATTERN,
                }
    return _document(UPDATE_EVENT_TYPE, OrderUpdated.DESCRIPTION, body, definitions)


def _single_value_as_const(node: dict[str, Any]) -> dict[str, Any] | None:
    """``{"enum": [x]}`` (how msgspec writes a one-value Literal) as ``{"const": x}``."""
    values = node.get("enum")
    if isinstance(values, list) and len(values) == 1:
        return {
            ("const" if key == "enum" else key): (values[0] if key == "enum" else value)
            for key, value in node.items()
        }
    return None


def schema_files() -> dict[str, dict[str, Any]]:
    """File name (under ``schemas/``) -> JSON Schema document."""
    files = {"envelope.json": envelope_schema()}
    for event_type in EventType:
        files[f"{event_type.value}.json"] = inbound_event_schema(event_type)
    files[f"{UPDATE_EVENT_TYPE}.json"] = order_updated_schema()
    return files


def render_json(document: Any) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------
# AsyncAPI
# --------------------------------------------------------------------------------------

_KAFKA_BINDING_VERSION: Final = "0.5.0"


def _order_id_key() -> dict[str, Any]:
    return {
        "kafka": {
            "key": {
                "type": "string",
                "format": "uuid",
                "description": (
                    "The order id as UTF-8 text: all of an order's messages share a partition, "
                    "so they stay in order."
                ),
            },
            "bindingVersion": _KAFKA_BINDING_VERSION,
        }
    }


#: W3C Trace Context, on an outbound message whose cause carried one (or with tracing on).
_TRACE_CONTEXT_HEADERS: Final = {
    "traceparent": {
        "type": "string",
        "description": (
            "W3C Trace Context: present when the inbound event that caused this message came "
            "with one (the same trace), or when orderflow's tracing is on."
        ),
        "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
    },
    "tracestate": {
        "type": "string",
        "description": "W3C Trace Context vendor state, carried on with its traceparent.",
        "maxLength": 512,
    },
}


def _text_header(description: str, **schema: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **schema}


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of orderflow's three topics (the application: orderflow)."""
    defaults = Settings(database_url=None, kafka_bootstrap_servers=None)
    schemas = f"../{SCHEMAS_DIRECTORY}"
    inbound_messages = {
        event_type.value: {"$ref": f"#/components/messages/{event_type.value}"}
        for event_type in EventType
    }
    messages: dict[str, Any] = {
        event_type.value: {
            "name": event_type.value,
            "title": event_type.value,
            "summary": _TRANSITIONS[event_type],
            "contentType": "application/json",
            "payload": {"$ref": f"{schemas}/{event_type.value}.json"},
            "bindings": _order_id_key(),
        }
        for event_type in EventType
    }
    messages[UPDATE_EVENT_TYPE] = {
        "name": UPDATE_EVENT_TYPE,
        "title": UPDATE_EVENT_TYPE,
        "summary": (
            "One applied change of one order with the order's whole state; or a backfill "
            "snapshot (change Snapshot, causation_id null)."
        ),
        "contentType": "application/json",
        "headers": {
            "type": "object",
            "properties": {
                "event_id": _text_header("The payload's event_id.", format="uuid"),
                "event_type": _text_header("Always OrderUpdated.", const=UPDATE_EVENT_TYPE),
                "content-type": _text_header("The payload's media type.", const="application/json"),
                **_TRACE_CONTEXT_HEADERS,
            },
            "required": ["event_id", "event_type", "content-type"],
        },
        "payload": {"$ref": f"{schemas}/{UPDATE_EVENT_TYPE}.json"},
        "bindings": _order_id_key(),
    }
    messages["DeadLetter"] = {
        "name": "DeadLetter",
        "title": "Dead letter",
        "summary": "An inbound message that cannot be applied, with why and where it came from.",
        "description": (
            "The original key and value bytes, untouched (the value may not even be JSON), "
            "with headers saying why it was rejected and where it came from. Consumption of "
            "the inbound topic goes on with the next message."
        ),
        "contentType": "application/octet-stream",
        "headers": {
            "type": "object",
            "properties": {
                "error.reason": _text_header(
                    "Why the message was rejected.",
                    enum=[reason.value for reason in DeadLetterReason],
                ),
                "error.message": _text_header(
                    "A human-readable sentence; names the JSON path of a bad field."
                ),
                "source.topic": _text_header("The inbound topic it was read from."),
                "source.partition": _text_header(
                    "The inbound partition, as decimal text.", pattern="^[0-9]+$"
                ),
                "source.offset": _text_header(
                    "The inbound offset, as decimal text.", pattern="^[0-9]+$"
                ),
                **_TRACE_CONTEXT_HEADERS,
                PARKED_MS_HEADER: _text_header(
                    "Only on a message that waited (was parked) for earlier events of its "
                    "order before it was dead-lettered: how long it waited, in milliseconds, "
                    "as decimal text.",
                    pattern="^[0-9]+$",
                ),
            },
            "required": [
                "error.reason",
                "error.message",
                "source.topic",
                "source.partition",
                "source.offset",
            ],
        },
        "payload": {"description": "The original message value, byte for byte."},
        "bindings": {
            "kafka": {
                "key": {"type": "string", "description": "The original message key, untouched."},
                "bindingVersion": _KAFKA_BINDING_VERSION,
            }
        },
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "orderflow",
            "version": "1",
            "description": (
                "Order events from upstream services are applied to PostgreSQL exactly once; "
                "every applied change is published as an OrderUpdated carrying the order's "
                "whole state; messages that cannot be applied go to a dead-letter topic. "
                "Topic names are the defaults; each can be changed with an environment "
                "variable (named in the channel's description). Tolerance rules: "
                "docs/events.md."
            ),
        },
        "defaultContentType": "application/json",
        "channels": {
            "orderEvents": {
                "address": defaults.inbound_topic,
                "title": "Inbound order events",
                "description": (
                    "Upstream services publish here, keyed by order_id. Env: "
                    "ORDERFLOW_INBOUND_TOPIC."
                ),
                "messages": inbound_messages,
            },
            "orderUpdates": {
                "address": defaults.outbound_topic,
                "title": "Order updates",
                "description": (
                    "One OrderUpdated per applied event, per order in increasing "
                    "order_version, at least once. Env: ORDERFLOW_OUTBOUND_TOPIC."
                ),
                "messages": {
                    UPDATE_EVENT_TYPE: {"$ref": f"#/components/messages/{UPDATE_EVENT_TYPE}"}
                },
            },
            "deadLetters": {
                "address": defaults.dlq_topic,
                "title": "Dead letters",
                "description": "Rejected inbound messages. Env: ORDERFLOW_DLQ_TOPIC.",
                "messages": {"DeadLetter": {"$ref": "#/components/messages/DeadLetter"}},
            },
        },
        "operations": {
            "receiveOrderEvents": {
                "action": "receive",
                "channel": {"$ref": "#/channels/orderEvents"},
                "summary": "orderflow consumes the events, in partition order.",
                "messages": [
                    {"$ref": f"#/channels/orderEvents/messages/{event_type.value}"}
                    for event_type in EventType
                ],
            },
            "sendOrderUpdates": {
                "action": "send",
                "channel": {"$ref": "#/channels/orderUpdates"},
                "summary": "The relay publishes each applied change.",
                "messages": [{"$ref": f"#/channels/orderUpdates/messages/{UPDATE_EVENT_TYPE}"}],
            },
            "sendDeadLetters": {
                "action": "send",
                "channel": {"$ref": "#/channels/deadLetters"},
                "summary": "The relay publishes each rejected inbound message.",
                "messages": [{"$ref": "#/channels/deadLetters/messages/DeadLetter"}],
            },
        },
        "components": {"messages": messages},
    }


_PLAIN_SCALAR: Final = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")
_YAML_WORDS: Final = frozenset(
    {"y", "n", "yes", "no", "true", "false", "on", "off", "null", "nan", "inf"}
)


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if _PLAIN_SCALAR.fullmatch(value) and value.lower() not in _YAML_WORDS:
            return value
        return _yaml_quoted(value)
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _yaml_printable(code: int) -> bool:
    """YAML's printable set, less the characters some readers take for line breaks."""
    if code in (0x2028, 0x2029, 0xFEFF):
        return False
    return 0x20 <= code <= 0x7E or 0xA0 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD


def _yaml_quoted(text: str) -> str:
    """A YAML double-quoted scalar: printable characters as they are, the rest escaped."""
    out = []
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif _yaml_printable(code):
            out.append(char)
        elif code > 0xFFFF:
            out.append(f"\\U{code:08x}")
        else:
            out.append(f"\\u{code:04x}")
    return '"' + "".join(out) + '"'


def render_yaml(value: Any, indent: int = 0) -> str:
    """YAML for dicts, lists, strings, integers, booleans and null (block style).

    A small emitter so the CLI needs no YAML library at run time; the tests load its
    output with PyYAML and compare.
    """
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        for key, item in value.items():
            name = _yaml_scalar(str(key))
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{name}:\n{render_yaml(item, indent + 2)}")
            elif isinstance(item, dict):
                lines.append(f"{pad}{name}: {{}}\n")
            elif isinstance(item, list):
                lines.append(f"{pad}{name}: []\n")
            else:
                lines.append(f"{pad}{name}: {_yaml_scalar(item)}\n")
        return "".join(lines)
    if isinstance(value, list):
        if not value:
            return pad + "[]\n"
        for item in value:
            if isinstance(item, dict | list) and item:
                nested = render_yaml(item, indent + 2)
                lines.append(f"{pad}- {nested[indent + 2 :]}")
            else:
                lines.append(f"{pad}- {render_yaml(item, 0).strip()}\n")
        return "".join(lines)
    return pad + _yaml_scalar(value) + "\n"


def render_asyncapi() -> str:
    return f"# {GENERATED_NOTE}\n" + render_yaml(asyncapi_document())


# --------------------------------------------------------------------------------------
# The field-limit table of docs/events.md
# --------------------------------------------------------------------------------------


def _resolve(node: Mapping[str, Any], definitions: Mapping[str, Any]) -> Mapping[str, Any]:
    reference = node.get("$ref")
    if isinstance(reference, str):
        resolved: Mapping[str, Any] = definitions[reference.removeprefix("#/$defs/")]
        return resolved
    return node


def _limits(node: Mapping[str, Any]) -> str:
    parts: list[str] = []
    if "const" in node:
        parts.append(f"exactly `{json.dumps(node['const'])}`")
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{value}`" for value in node["enum"]))
    low, high = node.get("minLength"), node.get("maxLength")
    if low is not None and high is not None:
        parts.append(f"{low} to {high:,} characters")
    elif high is not None:
        parts.append(f"at most {high:,} characters")
    elif low is not None:
        parts.append(f"at least {low} characters")
    low, high = node.get("minItems"), node.get("maxItems")
    if low is not None and high is not None:
        parts.append(f"{low} to {high:,} items")
    elif low is not None:
        parts.append(f"at least {low} items")
    low, high = node.get("minimum"), node.get("maximum")
    if low is not None and high is not None:
        parts.append(f"{low:,} to {high:,}")
    elif low is not None:
        parts.append(f"at least {low:,}")
    if "format" in node:
        parts.append(f"format {node['format']}")
    if "pattern" in node and node.get("type") == "string" and "anyOf" not in node:
        parts.append(f"pattern `{node['pattern']}`")
    return "; ".join(parts) or "-"


_JSON_TYPES: Final = {str: "string", int: "integer", bool: "boolean"}


def _kind(node: Mapping[str, Any]) -> str:
    if "anyOf" in node:
        return "money (string or number)"
    if "const" in node:
        return _JSON_TYPES.get(type(node["const"]), "any")
    if "enum" in node and "type" not in node:
        return "string"
    return str(node.get("type", "any"))


def _cell(text: str) -> str:
    """Table-cell text: a ``|`` (in a pattern) must not end the cell."""
    return text.replace("|", "\\|")


def _rows(
    path: str, node: Mapping[str, Any], definitions: Mapping[str, Any], required: bool
) -> Iterator[tuple[str, str, str, str]]:
    node = _resolve(node, definitions)
    if "anyOf" in node:
        money = (
            f"string matching `{INBOUND_MONEY_PATTERN}`, or a number from 0 up to "
            f"10^{MONEY_MAX_INTEGER_DIGITS} with at most {MONEY_MAX_SCALE} decimal places"
        )
        yield path, _kind(node), "yes" if required else "no", money
        return
    yield path, _kind(node), "yes" if required else "no", _limits(node)
    if node.get("type") == "object":
        needed = set(node.get("required", []))
        for name, child in node.get("properties", {}).items():
            yield from _rows(f"{path}.{name}", child, definitions, name in needed)
    elif node.get("type") == "array" and "items" in node:
        yield from _rows(f"{path}[]", node["items"], definitions, True)


def field_limits_markdown() -> str:
    """The table of every inbound field with its type and limits, from the schemas."""
    lines = [
        "| event | field | type | required | limits |",
        "| --- | --- | --- | --- | --- |",
    ]
    envelope = envelope_schema()
    for name, child in envelope["properties"].items():
        for path, kind, required, limits in _rows(name, child, {}, True):
            if path == "payload":
                limits = "an object; its fields depend on event_type (below)"
            lines.append(f"| all | `{path}` | {kind} | {required} | {_cell(limits)} |")
    for event_type in EventType:
        schema = inbound_event_schema(event_type)
        definitions = schema.get("$defs", {})
        payload = _resolve(schema["properties"]["payload"], definitions)
        fields = list(_rows("payload", payload, definitions, True))[1:]
        if not fields:
            lines.append(f"| {event_type.value} | `payload` | object | yes | `{{}}` (no fields) |")
        for path, kind, required, limits in fields:
            lines.append(
                f"| {event_type.value} | `{path}` | {kind} | {required} | {_cell(limits)} |"
            )
    return "\n".join(lines) + "\n"


def with_limits_table(markdown: str) -> str:
    """``markdown`` (docs/events.md) with its generated block brought up to date."""
    start = markdown.find(LIMITS_BEGIN)
    end = markdown.find(LIMITS_END)
    if start < 0 or end < start:
        raise ValueError(
            f"{EVENTS_DOC_PATH} lost its generated block: put the lines {LIMITS_BEGIN!r} and "
            f"{LIMITS_END!r} back where the field-limit table belongs"
        )
    head = markdown[: start + len(LIMITS_BEGIN)]
    return f"{head}\n{field_limits_markdown()}{markdown[end:]}"


# --------------------------------------------------------------------------------------
# Writing and checking the files
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drift:
    """One generated file whose content on disk differs from the code's."""

    path: str
    diff: str


def generated_files(directory: Path) -> dict[str, str]:
    """Relative path -> expected content, for every generated file under ``directory``.

    ``docs/events.md`` is prose with one generated block: it is included when it exists.
    """
    files = {
        f"{SCHEMAS_DIRECTORY}/{name}": render_json(document)
        for name, document in schema_files().items()
    }
    files[ASYNCAPI_PATH] = render_asyncapi()
    events_doc = directory / EVENTS_DOC_PATH
    if events_doc.exists():
        files[EVENTS_DOC_PATH] = with_limits_table(events_doc.read_text(encoding="utf-8"))
    return files


def find_drift(directory: Path, *, context_lines: int = 40) -> list[Drift]:
    """Every generated file that is missing or differs; empty when all are in sync.

    Also reports stray ``*.json`` files in ``schemas/`` that the code no longer generates.
    """
    expected = generated_files(directory)
    drift: list[Drift] = []
    for relative, content in expected.items():
        path = directory / relative
        if not path.exists():
            drift.append(Drift(relative, "missing"))
            continue
        actual = path.read_text(encoding="utf-8")
        if actual != content:
            lines = list(
                difflib.unified_diff(
                    actual.splitlines(),
                    content.splitlines(),
                    f"{relative} (on disk)",
                    f"{relative} (from the code)",
                    lineterm="",
                )
            )
            shown = lines[:context_lines]
            if len(lines) > context_lines:
                shown.append(f"... {len(lines) - context_lines} more diff lines")
            drift.append(Drift(relative, "\n".join(shown)))
    drift.extend(
        Drift(relative, "no longer generated by the code: delete it")
        for relative in stray_files(directory)
    )
    return drift


def stray_files(directory: Path) -> list[str]:
    """``*.json`` files in ``schemas/`` that the code does not generate (any more)."""
    schemas = directory / SCHEMAS_DIRECTORY
    if not schemas.is_dir():
        return []
    expected = set(schema_files())
    return [
        f"{SCHEMAS_DIRECTORY}/{path.name}"
        for path in sorted(schemas.glob("*.json"))
        if path.name not in expected
    ]


def write_files(directory: Path) -> list[str]:
    """Write every generated file under ``directory``; return the paths that changed."""
    changed: list[str] = []
    for relative, content in generated_files(directory).items():
        path = directory / relative
        if path.exists() and path.read_text(encoding="utf-8") == content:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        changed.append(relative)
    return changed
