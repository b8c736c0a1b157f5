"""The task decorator and triggering from code: typed payloads are validated at the call."""

import json
from dataclasses import dataclass

import pytest
from pydantic import BaseModel

import conveyor
from conveyor import BatchItem, Concurrency, Queue, Retry, task
from conveyor.core.errors import ConveyorError, InvalidOptions, InvalidPayload, UnknownTask
from conveyor.sdk.registry import REGISTRY


class Message(BaseModel):
    user_id: int
    text: str


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    REGISTRY.clear()


def test_decorator_options_and_defaults(client):
    @task(
        "process-message",
        queue=Queue("ai", concurrency_limit=5),
        retry=Retry(max_attempts=4),
        concurrency=Concurrency(limit=1, key=lambda p: p["user_id"]),
        max_duration=60,
        machine="large-1x",
    )
    async def process(payload: Message, ctx) -> dict:
        return {}

    assert process.id == "process-message" and process.is_async and process.takes_ctx
    record = client.task_record(process)
    assert (record.queue, record.machine) == ("ai", "large-1x")
    assert record.options["queue_limit"] == 5 and record.options["key_limit"] == 1
    assert record.options["retry"]["max_attempts"] == 4 and record.options["max_duration"] == 60
    assert record.payload_schema["properties"]["user_id"]["type"] == "integer"


def test_default_queue_is_the_task_id_and_bare_decorator_works(client):
    @task
    def send_email(payload):
        return payload

    assert send_email.id == "send-email" and send_email.queue.name == "send-email" and not send_email.is_async
    assert send_email({"a": 1}) == {"a": 1}  # calling the task runs the plain function


def test_typed_payload_is_validated_at_trigger(client):
    @task("typed")
    async def typed(payload: Message):
        return payload.text

    handle = typed.trigger({"user_id": "42", "text": "hi"})
    assert client.runs.retrieve(handle.id).payload == {"user_id": 42, "text": "hi"}
    assert typed.trigger(Message(user_id=1, text="x")).id
    with pytest.raises(InvalidPayload, match=r"payload of typed is invalid: user_id: .*integer"):
        typed.trigger({"user_id": "nope", "text": "hi"})
    assert len(client.runs.list()) == 2


def test_dataclass_payload(client):
    @dataclass
    class Order:
        id: int

    @task("orders")
    def orders(payload: Order):
        return payload.id

    assert orders.trigger({"id": 3}).id
    with pytest.raises(InvalidPayload):
        orders.trigger({"id": "x"})


def test_untyped_payload_must_be_json(client):
    @task("loose")
    async def loose(payload):
        return None

    with pytest.raises(InvalidPayload, match="not JSON-serialisable"):
        loose.trigger({"when": object()})
    assert client.runs.list().data == []


def test_key_functions_derive_keys_and_trigger_options_win(client):
    @task(
        "keyed",
        concurrency=Concurrency(limit=1, key=lambda p: p["user"]),
        idempotency_key=lambda p: f"u-{p['update']}",
        priority=lambda p: p.get("prio", 0),
    )
    async def keyed(payload):
        return None

    run = client.runs.retrieve(keyed.trigger({"user": 7, "update": 1, "prio": 30}).id)
    assert (run.concurrency_key, run.idempotency_key, run.priority) == ("7", "u-1", 30)
    again = keyed.trigger({"user": 7, "update": 1})
    assert again.id == run.id
    other = client.runs.retrieve(
        keyed.trigger({"user": 7, "update": 1}, idempotency_key="explicit", concurrency_key="c").id
    )
    assert (other.idempotency_key, other.concurrency_key) == ("explicit", "c")


def test_key_function_that_fails_is_a_clear_payload_error(client):
    @task("broken-key", idempotency_key=lambda p: p["missing"])
    async def broken(payload):
        return None

    with pytest.raises(InvalidPayload, match="computing the idempotency key from the payload failed"):
        broken.trigger({})


def test_batch_trigger_is_all_or_nothing_and_names_bad_items(client):
    @task("batched")
    async def batched(payload: Message):
        return None

    good = {"user_id": 1, "text": "a"}
    with pytest.raises(InvalidPayload, match=r"item 1: .*item 3: "):
        batched.batch_trigger([good, {"user_id": "x"}, good, BatchItem({"text": 1})])
    assert client.runs.list().data == []
    handles = batched.batch_trigger([good, BatchItem(good, {"tags": ["b"]})])
    assert [client.runs.retrieve(h.id).tags for h in handles] == [[], ["b"]]


def test_trigger_by_id_without_the_code(client):
    @task("local")
    async def local(payload: Message):
        return None

    client.engine.register([client.task_record(local)], [local.queue_spec()])
    REGISTRY.clear()
    # No code here: the payload is checked against the JSON Schema the worker registered.
    with pytest.raises(InvalidPayload, match=r"payload of local is invalid: \(root\): 'user_id' is a required"):
        conveyor.trigger("local", {"anything": True})
    with pytest.raises(InvalidPayload, match="user_id: 'x' is not of type 'integer'"):
        conveyor.trigger("local", {"user_id": "x", "text": "t"})
    handle = conveyor.trigger("local", {"user_id": 1, "text": "t"})
    assert client.runs.retrieve(handle.id).task_id == "local"
    with pytest.raises(UnknownTask):
        conveyor.trigger("missing", {})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"id": "Bad Id"}, "task id"),
        ({"id": "ok", "max_duration": 0}, "max_duration"),
        ({"id": "ok", "on_strat": print}, "unknown option"),
        ({"id": "ok", "concurrency": None, "retry": {"max_attempts": 3}}, "retry must be"),
    ],
)
def test_invalid_task_definitions(kwargs, message):
    with pytest.raises(InvalidOptions, match=message):
        task(**kwargs)(lambda p: None)


def test_zero_limits_are_refused():
    with pytest.raises(InvalidOptions, match="Concurrency limit"):
        Concurrency(limit=0)
    with pytest.raises(InvalidOptions, match="concurrency_limit must be >= 1"):
        Queue("q", concurrency_limit=0)


def test_metadata_outside_a_run_is_a_clear_error():
    with pytest.raises(ConveyorError, match="only available inside a running task"):
        conveyor.metadata.set("k", 1)


def test_handle_wait_inside_a_run_points_to_trigger_and_wait(client):
    from conveyor.sdk import context
    from conveyor.sdk.task import RunHandle

    token = context.enter(object())  # type: ignore[arg-type]
    try:
        with pytest.raises(ConveyorError, match="trigger_and_wait"):
            RunHandle("run_x", client).wait()
    finally:
        context.leave(token)


def test_idempotency_key_scopes():
    from conveyor.sdk import context
    from conveyor.sdk.context import AttemptInfo, Context, Execution, RunInfo, TaskInfo

    assert conveyor.idempotency_key("a", 1) == conveyor.idempotency_key(["a", 1], scope="global")

    def inside(run_id, attempt):
        ctx = Context(RunInfo(run_id, [], 0.0, 0.0), AttemptInfo(attempt, 0.0), TaskInfo("t", "t"), "dev", None, "x")
        return context.enter(Execution(ctx=ctx, channel=None))  # type: ignore[arg-type]

    token = inside("run_1", 1)
    try:
        run_key, attempt_key = conveyor.idempotency_key("a"), conveyor.idempotency_key("a", scope="attempt")
        global_key = conveyor.idempotency_key("a", scope="global")
    finally:
        context.leave(token)
    token = inside("run_1", 2)
    try:
        assert conveyor.idempotency_key("a") == run_key  # a retry finds the same key
        assert conveyor.idempotency_key("a", scope="attempt") != attempt_key
    finally:
        context.leave(token)
    token = inside("run_2", 1)
    try:
        assert conveyor.idempotency_key("a") != run_key
        assert conveyor.idempotency_key("a", scope="global") == global_key
    finally:
        context.leave(token)
    assert conveyor.idempotency_key("a") == global_key  # outside a run every scope is global
    with pytest.raises(InvalidOptions, match="scope must be one of"):
        conveyor.idempotency_key("a", scope="user")


def test_pydantic_aliases_survive_the_round_trip(client):
    from pydantic import Field

    class Update(BaseModel):
        id: int
        from_: int | None = Field(None, alias="from")

    @task("aliased", idempotency_key=lambda p: f"u-{p['from']}")
    async def aliased(payload: Update):
        return payload.from_

    run = client.runs.retrieve(aliased.trigger({"id": 1, "from": 7}).id)
    assert run.payload == {"id": 1, "from": 7} and run.idempotency_key == "u-7"
    assert aliased.payload_type.load(json.dumps(run.payload)).from_ == 7


def test_a_queue_override_must_name_a_known_queue(client):
    @task("home", queue=Queue("home"))
    async def home(payload):
        return None

    client.engine.register([client.task_record(home)], [home.queue_spec()])
    with pytest.raises(conveyor.UnknownQueue, match="no queue 'elsewhere'"):
        home.trigger({}, queue="elsewhere")
    assert home.trigger({}, queue="home").id
