"""The contract files: generated from the code, in sync, and true of what the code does.

- the checked-in schemas/, docs/asyncapi.yaml and the field table of docs/events.md equal
  what the code generates now;
- every OrderUpdated that build_update writes (each change, and a Snapshot) validates
  against schemas/OrderUpdated.json and has exactly the fields of the OrderUpdated struct;
- inbound events: what a schema accepts, the consumer accepts; what the consumer rejects
  for its shape, the schemas reject; realistic traffic agrees with both;
- the AsyncAPI document refers to files that exist and lists every dead-letter reason.
"""

from __future__ import annotations

import copy
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from consumer.errors import DeadLetterReason, RejectedEvent
from consumer.events import EventType, decode_event
from consumer.state_machine import transition
from consumer.updates import SNAPSHOT_CHANGE, build_update, update_event_id
from orderflow import contracts
from orderflow.cli.main import app
from orderflow.runtime.settings import Settings
from orderflow.tools.samples import SampleStream
from tests import events

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"
ORDER_ID = uuid.UUID("0b6c6a53-2222-4a57-8f44-6d1b1c9e2a10")


def validator(name: str) -> Draft202012Validator:
    schema = orjson.loads((SCHEMAS / name).read_bytes())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def schema_errors(name: str, document: Any) -> list[str]:
    return [
        f"{error.json_path}: {error.message}" for error in validator(name).iter_errors(document)
    ]


def type_schema(document: Any) -> str:
    """The schema file for an inbound document: its type's, or the envelope's."""
    event_type = document.get("event_type") if isinstance(document, dict) else None
    if event_type in {event_type.value for event_type in EventType}:
        return f"{event_type}.json"
    return "envelope.json"


def consumer_accepts(value: bytes) -> bool:
    try:
        decode_event(None, value)
    except RejectedEvent:
        return False
    return True


# -- the files are what the code generates ---------------------------------------------


def test_the_checked_in_files_are_what_the_code_generates() -> None:
    drift = contracts.find_drift(ROOT)
    assert not drift, (
        "the contract files differ from the code; run `orderflow schemas write` from the "
        "project root and commit the result:\n" + "\n".join(item.diff for item in drift)
    )


def test_there_is_one_schema_per_inbound_event_type_plus_envelope_and_update() -> None:
    expected = {f"{event_type.value}.json" for event_type in EventType}
    expected |= {"envelope.json", "OrderUpdated.json"}
    assert {path.name for path in SCHEMAS.glob("*.json")} == expected
    for name in expected:
        validator(name)  # each is a valid draft 2020-12 schema


def test_the_field_table_carries_the_models_limits() -> None:
    table = (ROOT / "docs" / "events.md").read_text()
    assert re.search(
        r"\| OrderPlaced \| `payload.lines\[\].sku` \| string \| yes \| 1 to 64 ", table
    )
    assert re.search(r"`payload.lines\[\].quantity` \| integer \| yes \| 1 to 1,000,000 \|", table)
    assert re.search(
        r"\| OrderCancelled \| `payload.reason` \| string \| yes \| at most 1,000 ", table
    )
    assert "| all | `schema_version` | integer | yes | exactly `1` |" in table


# -- OrderUpdated -----------------------------------------------------------------------


def lifecycle_updates(final: str) -> list[dict[str, Any]]:
    """Real build_update output for each step of one order's life, through the pure core."""
    at = datetime(2026, 11, 24, 10, 15, tzinfo=UTC)
    steps = [
        events.placed(ORDER_ID, lines=[
            {"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"},
            {"sku": "SKU-2", "quantity": 1, "unit_price": 0.1},
        ]),
        events.paid(ORDER_ID, amount="25.10"),
    ]  # fmt: skip
    if final == "delivered":
        steps += [events.shipped(ORDER_ID), events.delivered(ORDER_ID)]
    else:
        steps.append(events.cancelled(ORDER_ID))
    state = None
    documents = []
    for index, (key, value) in enumerate(steps):
        event = decode_event(key, value)
        state = transition(state, event, at=at + timedelta(minutes=index))
        documents.append(
            orjson.loads(
                build_update(
                    state,
                    event_id=update_event_id(event.event_id),
                    change=event.event_type.value,
                    causation_id=event.event_id,
                    occurred_at=at + timedelta(minutes=index, microseconds=index),
                )
            )
        )
    assert state is not None
    snapshot = build_update(
        state,
        event_id=uuid.uuid4(),
        change=SNAPSHOT_CHANGE,
        causation_id=None,
        occurred_at=at + timedelta(hours=1),
    )
    return [*documents, orjson.loads(snapshot)]


def shape(value: Any) -> Any:
    """The field names at every level (lists: of their first item)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [shape(value[0])] if value else []
    return None


@pytest.mark.parametrize("final", ["delivered", "cancelled"])
def test_every_update_build_update_writes_validates_and_has_the_structs_fields(
    final: str,
) -> None:
    documents = lifecycle_updates(final)
    assert {document["change"] for document in documents} >= {"OrderPlaced", SNAPSHOT_CHANGE}
    for document in documents:
        assert schema_errors("OrderUpdated.json", document) == [], document
        decoded = msgspec.json.decode(orjson.dumps(document), type=contracts.OrderUpdated)
        # The struct has exactly the fields build_update writes: no more, no fewer.
        assert shape(msgspec.to_builtins(decoded)) == shape(document)
    snapshot = documents[-1]
    assert snapshot["causation_id"] is None
    assert snapshot["order_version"] == documents[-2]["order_version"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("order_version", 0),
        ("schema_version", 2),
        ("event_type", "OrderChanged"),
        ("occurred_at", "2026-11-24T10:15:00"),
        ("causation_id", "not-a-uuid"),
    ],
)
def test_the_update_schema_rejects_what_orderflow_never_writes(field: str, value: Any) -> None:
    document = lifecycle_updates("delivered")[0]
    document[field] = value
    assert schema_errors("OrderUpdated.json", document)


def test_the_update_schema_rejects_money_with_an_exponent_and_unknown_statuses() -> None:
    document = lifecycle_updates("delivered")[0]
    document["order"]["total"] = "1E+2"
    assert schema_errors("OrderUpdated.json", document)
    document = lifecycle_updates("delivered")[0]
    document["order"]["status"] = "lost"
    assert schema_errors("OrderUpdated.json", document)


# -- inbound events ---------------------------------------------------------------------


def envelope(event_type: str, payload: Any, **fields: Any) -> dict[str, Any]:
    document = {
        "event_id": "7d9f0c1e-1111-4f6e-9d5c-0a7c2b8f9e01",
        "event_type": event_type,
        "schema_version": 1,
        "occurred_at": "2026-11-24T10:15:00Z",
        "order_id": str(ORDER_ID),
        "payload": payload,
    }
    document.update(fields)
    return document


PLACED_PAYLOAD = {
    "customer": {"email": "a@example.com", "name": "Ada"},
    "currency": "EUR",
    "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
}
VALID = {
    "OrderPlaced": envelope("OrderPlaced", PLACED_PAYLOAD),
    "OrderPlaced, money as numbers": envelope(
        "OrderPlaced",
        {**PLACED_PAYLOAD, "lines": [{"sku": "S", "quantity": 1, "unit_price": 12.5}]},
    ),
    "OrderPlaced, unknown fields everywhere": envelope(
        "OrderPlaced",
        {
            "customer": {"email": "a@example.com", "name": "Ada", "vip": True},
            "currency": "EUR",
            "lines": [{"sku": "S", "quantity": 1, "unit_price": "1", "gift": False}],
            "channel": "web",
        },
        trace_id="abc",
    ),
    "OrderPaid": envelope("OrderPaid", {"payment_id": "pay_1", "amount": "25.00"}),
    "OrderShipped": envelope("OrderShipped", {"carrier": "DHL", "tracking_number": "T1"}),
    "OrderDelivered": envelope("OrderDelivered", {}),
    "OrderCancelled": envelope("OrderCancelled", {"reason": ""}),
    "an offset instead of Z": envelope(
        "OrderDelivered", {}, occurred_at="2026-11-24T11:15:00.5+01:00"
    ),
}


@pytest.mark.parametrize("name", list(VALID))
def test_valid_events_pass_the_schema_and_the_consumer(name: str) -> None:
    document = VALID[name]
    assert schema_errors(type_schema(document), document) == []
    assert schema_errors("envelope.json", document) == []
    assert consumer_accepts(orjson.dumps(document))


def test_the_contracts_example_envelope_validates() -> None:
    contract = (ROOT / "docs" / "contract.md").read_text()
    example = re.search(r"```json\n(\{.*?\n\})\n```", contract, re.S)
    assert example is not None
    document = orjson.loads(example.group(1))
    assert schema_errors("envelope.json", document) == []


def mutated(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``base`` with ``path`` (dots; ``[n]`` for a list item) set, or removed."""
    document = copy.deepcopy(base)
    *parents, last = re.findall(r"[^.\[\]]+", path)
    target: Any = document
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is REMOVE:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return document


REMOVE = object()
PLACED = VALID["OrderPlaced"]
INVALID = {
    "no event_id": mutated(PLACED, "event_id", REMOVE),
    "event_id not a UUID": mutated(PLACED, "event_id", "oops"),
    "schema_version 2": mutated(PLACED, "schema_version", 2),
    "schema_version as text": mutated(PLACED, "schema_version", "1"),
    "occurred_at without time zone": mutated(PLACED, "occurred_at", "2026-11-24T10:15:00"),
    "occurred_at not a time": mutated(PLACED, "occurred_at", "yesterday"),
    "order_id null": mutated(PLACED, "order_id", None),
    "unknown event_type": mutated(PLACED, "event_type", "OrderTeleported"),
    "payload null": mutated(PLACED, "payload", None),
    "no lines": mutated(PLACED, "payload.lines", []),
    "quantity 0": mutated(PLACED, "payload.lines.0.quantity", 0),
    "quantity true": mutated(PLACED, "payload.lines.0.quantity", True),
    "quantity 1.5": mutated(PLACED, "payload.lines.0.quantity", 1.5),
    "sku of 65 characters": mutated(PLACED, "payload.lines.0.sku", "S" * 65),
    "empty customer name": mutated(PLACED, "payload.customer.name", ""),
    "email without @": mutated(PLACED, "payload.customer.email", "ada.example.com"),
    "lower-case currency": mutated(PLACED, "payload.currency", "eur"),
    "negative price": mutated(PLACED, "payload.lines.0.unit_price", "-1.00"),
    "price with 5 decimals (text)": mutated(PLACED, "payload.lines.0.unit_price", "1.00001"),
    "price of 10^14": mutated(PLACED, "payload.lines.0.unit_price", 10**14),
    "price not a number": mutated(PLACED, "payload.lines.0.unit_price", "twelve"),
    "price as a boolean": mutated(PLACED, "payload.lines.0.unit_price", True),
    "missing customer": mutated(PLACED, "payload.customer", REMOVE),
    "OrderPaid without amount": mutated(VALID["OrderPaid"], "payload.amount", REMOVE),
    "OrderShipped, carrier of 201 characters": mutated(
        VALID["OrderShipped"], "payload.carrier", "C" * 201
    ),
    "OrderCancelled, reason of 1001 characters": mutated(
        VALID["OrderCancelled"], "payload.reason", "r" * 1001
    ),
    "OrderDelivered, payload a list": mutated(VALID["OrderDelivered"], "payload", []),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_events_fail_the_schema_and_the_consumer(name: str) -> None:
    document = INVALID[name]
    assert not consumer_accepts(orjson.dumps(document))
    assert schema_errors(type_schema(document), document), f"the schema accepts: {name}"


def test_realistic_traffic_passes_or_fails_the_schemas_as_the_consumer_decides() -> None:
    """Sample traffic with every kind of mistake: the schema and the decoder agree."""
    stream = SampleStream(11, fault_every=4)
    checked = 0
    for message in (next(stream) for _ in range(600)):
        assert message.value is not None
        try:
            document = orjson.loads(message.value)
        except orjson.JSONDecodeError:
            assert message.expect == "malformed_json"
            continue
        valid = not schema_errors(type_schema(document), document)
        shape_is_wrong = message.expect in {"schema_violation", "unknown_event_type"}
        assert valid is not shape_is_wrong, (message.expect, document)
        assert valid is consumer_accepts(message.value)
        checked += 1
    assert checked > 500


# Money goes as text here: for a JSON *number*, the decimal places are the one limit a
# JSON Schema can't express (docs/events.md says so), so the property would not hold.
_money = st.one_of(
    st.from_regex(r"\A-?[0-9]{1,16}(\.[0-9]{0,6})?\Z"),
    st.decimals(allow_nan=True, allow_infinity=True, places=None).map(str),
    st.integers(min_value=-10, max_value=10**15),
)
_text = st.text(max_size=210)
_line = st.fixed_dictionaries(
    {
        "sku": st.text(max_size=70),
        "quantity": st.one_of(st.integers(min_value=-1, max_value=1_000_001), st.booleans()),
        "unit_price": _money,
    }
)
_payloads = {
    "OrderPlaced": st.fixed_dictionaries(
        {
            "customer": st.fixed_dictionaries(
                {
                    "email": st.one_of(st.emails(), st.text(max_size=12)),
                    "name": _text,
                }
            ),
            "currency": st.one_of(st.sampled_from(["EUR", "USD"]), st.text(max_size=4)),
            "lines": st.lists(_line, max_size=3),
        }
    ),
    "OrderPaid": st.fixed_dictionaries({"payment_id": _text, "amount": _money}),
    "OrderShipped": st.fixed_dictionaries({"carrier": _text, "tracking_number": _text}),
    "OrderCancelled": st.fixed_dictionaries({"reason": st.text(max_size=1010)}),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(_payloads)).flatmap(
        lambda event_type: st.tuples(st.just(event_type), _payloads[event_type])
    ),
    st.sampled_from(["2026-11-24T10:15:00Z", "2026-11-24T10:15:00", "2026-11-24T10:15:00+02:00"]),
    st.sampled_from([1, 2, "1"]),
)
def test_what_a_schema_accepts_the_consumer_accepts(
    typed_payload: tuple[str, dict[str, Any]], occurred_at: str, schema_version: Any
) -> None:
    event_type, payload = typed_payload
    document = envelope(event_type, payload, occurred_at=occurred_at, schema_version=schema_version)
    value = orjson.dumps(document)
    if not schema_errors(f"{event_type}.json", document):
        assert consumer_accepts(value), document
    if consumer_accepts(value) and isinstance(document["payload"], dict):
        # The consumer is at most as lenient about money text as Decimal() is; otherwise
        # it agrees with the schema.
        assert not schema_errors(f"{event_type}.json", document) or _lenient_money(document)


def _lenient_money(document: dict[str, Any]) -> bool:
    """Money text the consumer reads but the schema does not recommend (``1E+2``, ``.5``)."""
    amounts = [line["unit_price"] for line in document["payload"].get("lines", [])]
    amounts += [document["payload"]["amount"]] if "amount" in document["payload"] else []
    pattern = re.compile(contracts.INBOUND_MONEY_PATTERN)
    return any(isinstance(amount, str) and not pattern.match(amount) for amount in amounts)


# -- AsyncAPI ---------------------------------------------------------------------------


def load_asyncapi() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / contracts.ASYNCAPI_PATH).read_text())
    assert isinstance(document, dict)
    return document


def references(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in references(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in references(value)]
    return []


def test_the_asyncapi_document_describes_the_three_topics() -> None:
    document = load_asyncapi()
    assert document["asyncapi"].startswith("3.")
    defaults = Settings(database_url=None, kafka_bootstrap_servers=None)
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {defaults.inbound_topic, defaults.outbound_topic, defaults.dlq_topic}
    messages = document["components"]["messages"]
    assert set(messages) == {event_type.value for event_type in EventType} | {
        "OrderUpdated",
        "DeadLetter",
    }
    for name, message in messages.items():
        assert message["bindings"]["kafka"]["key"]["type"] == "string", name
    assert set(messages["OrderUpdated"]["headers"]["required"]) == {
        "event_id",
        "event_type",
        "content-type",
    }


def test_every_asyncapi_reference_resolves() -> None:
    document = load_asyncapi()
    refs = references(document)
    assert refs
    for ref in refs:
        if ref.startswith("#/"):
            target: Any = document
            for part in ref[2:].split("/"):
                target = target[part]
            assert isinstance(target, dict), ref
        else:
            path = (ROOT / "docs" / ref).resolve()
            assert path.is_file(), f"{ref} does not exist"
            Draft202012Validator.check_schema(orjson.loads(path.read_bytes()))
    files = {ref.rsplit("/", 1)[-1] for ref in refs if not ref.startswith("#")}
    assert files >= {f"{event_type.value}.json" for event_type in EventType} | {"OrderUpdated.json"}


def test_the_dead_letter_headers_list_every_reason_the_consumer_gives() -> None:
    headers = load_asyncapi()["components"]["messages"]["DeadLetter"]["headers"]
    assert headers["properties"]["error.reason"]["enum"] == [r.value for r in DeadLetterReason]
    assert {"error.message", "source.topic", "source.partition", "source.offset"} <= set(
        headers["required"]
    )


_yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"])),
    st.sampled_from(["yes", "No", "null", "3.0.0", "1", "-", "a: b", "#x", "$ref", ""]),
)
_yaml_values = st.recursive(
    _yaml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_yaml_values)
def test_the_yaml_writer_round_trips(value: Any) -> None:
    assert yaml.safe_load(contracts.render_yaml(value)) == value


@pytest.mark.parametrize("value", [{"A\n": None}, "A\n", ["A\n"], {"k": "A\n"}])
def test_the_yaml_writer_quotes_a_word_with_a_trailing_line_break(value: Any) -> None:
    # Found by the property above, once in a while: a regex's ``$`` also matches before
    # a final newline, and such a word went out unquoted.
    assert yaml.safe_load(contracts.render_yaml(value)) == value


# -- the command ------------------------------------------------------------------------


def test_schemas_write_then_check_and_a_drifted_file_names_the_fix(tmp_path: Path) -> None:
    runner = CliRunner()
    written = runner.invoke(app, ["schemas", "write", "--directory", str(tmp_path)])
    assert written.exit_code == 0, written.output
    assert (tmp_path / "schemas" / "OrderPlaced.json").read_text() == (
        SCHEMAS / "OrderPlaced.json"
    ).read_text()
    assert (tmp_path / "docs" / "asyncapi.yaml").is_file()

    checked = runner.invoke(app, ["schemas", "write", "--check", "--directory", str(tmp_path)])
    assert checked.exit_code == 0, checked.output

    paid = tmp_path / "schemas" / "OrderPaid.json"
    paid.write_text(paid.read_text().replace('"maxLength": 200', '"maxLength": 100'))
    (tmp_path / "schemas" / "OrderRefunded.json").write_text("{}")
    drifted = runner.invoke(app, ["schemas", "write", "--check", "--directory", str(tmp_path)])
    assert drifted.exit_code == 1
    assert "schemas/OrderPaid.json (on disk)" in drifted.output
    assert re.search(r'^-\s+"maxLength": 100,$', drifted.output, re.M)
    assert re.search(r'^\+\s+"maxLength": 200,$', drifted.output, re.M)
    assert "schemas/OrderRefunded.json: no longer generated" in drifted.output
    assert "run `orderflow schemas write`" in drifted.output

    rewritten = runner.invoke(app, ["schemas", "write", "--directory", str(tmp_path)])
    assert rewritten.exit_code == 0
    assert "updated: schemas/OrderPaid.json" in rewritten.output
    assert "delete: schemas/OrderRefunded.json" in rewritten.output


def test_schemas_show_prints_the_checked_in_schema() -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["schemas", "show", "OrderUpdated"])
    assert shown.exit_code == 0
    assert shown.stdout == (SCHEMAS / "OrderUpdated.json").read_text()
    unknown = runner.invoke(app, ["schemas", "show", "OrderLost"])
    assert unknown.exit_code == 2
    assert "no schema named 'OrderLost'" in unknown.output
