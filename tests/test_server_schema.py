"""Schemathesis against the OpenAPI schema the server publishes: requests generated for every
operation, valid ones and invalid ones, a bounded number each; none may answer 5xx, and every
error keeps OpenAI's shape."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error

from test_server_harness import Server, make_key

EXAMPLES = 8      # per operation and generation mode


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("schema")
    key = make_key(data, "fuzz")
    srv = Server(data, "--workers", "0", "--model", f"tiny={tiny_model_dir}",
                 "--max-upload-mb", "1")
    srv.key = key
    yield srv
    assert srv.proc.poll() is None, "the server died"
    srv.stop()


def openai_error_shape(ctx, response, case):
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"]
    return True


def test_no_server_errors(api):
    # (schemathesis' pytest integration does not load under this pytest; its strategies do)
    schema = schemathesis.openapi.from_url(api.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 20
    headers = {"Authorization": f"Bearer {api.key}"}
    tested = 0
    seen: dict = {}
    for op in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                r = case.call_and_validate(base_url=api.url, headers=headers,
                                       checks=[not_a_server_error, openai_error_shape])
                seen[(op.label, r.status_code)] = seen.get((op.label, r.status_code), 0) + 1
            try:
                check()
            except Unsatisfiable:   # nothing invalid to send (an operation without inputs)
                assert mode == schemathesis.GenerationMode.NEGATIVE, op.label
            tested += 1
    assert tested >= 40
    assert sum(n for (_, status), n in seen.items() if status < 300) > 50   # not only 4xx
    with api.http(api.key) as h:
        assert h.get("/v1/tunelab/info").status_code == 200
