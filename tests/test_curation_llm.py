"""The LLM client against a real local chat-completions + Files/Batches server: retries, failures
per item, order, cache (SQLite, shared by processes, old file caches read), key hygiene, concurrency
bound, connection reuse, cost; the Batch API mode end to end with a kill and a re-attach; the two
tasks; label_seeds end to end with resume."""
from __future__ import annotations

import email
import json
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sapretrain.curation.llm import (CACHE_FILE, AnswerCache, LLMClient, LLMConfig, LLMError, LLMFatalError, check_required,
                                     format_stats, generate_negatives_llm, label_triplets, load_llm_config,
                                     parse_json_object, render_prompt, sample_seeds)
from sapretrain.curation.stage import dropped_output

KEY = "sk-test-DO-NOT-LEAK-4242"
USAGE = {"prompt_tokens": 30, "completion_tokens": 7}


class FakeLLM:
    """A chat-completions server with the Files and Batches endpoints. By default it answers each
    request with ``answer(user_text)``; ``plan[marker]`` is a list of actions used, one per request
    (online or a batch line), for requests whose user message contains ``marker``: ``("status",
    code, headers)``, ``("sleep", s)``, ``("content", text)``, ``("echo_auth", code)`` (an error body
    quoting the Authorization header); for batch lines also ``("batch_error", code)`` (an error
    line without a response) and ``("drop",)`` (the line is in neither output file).

    A batch goes validating → in_progress → finalizing → completed, one step per GET; with
    ``hold`` set it stays in_progress. ``connections`` counts the TCP connections accepted."""

    def __init__(self):
        self.plan: dict[str, list] = {}
        self.requests: list[dict] = []  # chat completions only
        self.calls: list[tuple[str, str]] = []  # (method, path) of every request
        self.active = self.max_active = 0
        self.delay = 0.0
        self.connections = 0
        self.files: dict[str, bytes] = {}
        self.uploads: list[dict] = []
        self.batches: dict[str, dict] = {}
        self.batch_lines: list[dict] = []  # every line a batch ran
        self.hold = False
        self.fail_batch: str | None = None  # a validation error: the next batch goes to failed
        self.create_status: list[int] = []  # statuses answered to POST /batches before creating one
        self.lock = threading.Lock()
        self.answer = lambda user: json.dumps({"label": 1, "reason": user.split("\n")[0]})

    def next_action(self, user: str):
        with self.lock:
            for marker, actions in self.plan.items():
                if marker in user and actions:
                    return actions.pop(0)
        return None

    def completion(self, content: str) -> dict:
        return {"choices": [{"message": {"role": "assistant", "content": content}}], "usage": USAGE}

    def upload(self, content_type: str, raw: bytes) -> dict:
        form = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        parts = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                 for part in form.get_payload()}
        assert parts["purpose"] == b"batch", parts.get("purpose")
        with self.lock:
            file_id = f"file-{len(self.files)}"
            self.files[file_id] = parts["file"]
            self.uploads.append({"id": file_id, "lines": parts["file"].decode().splitlines()})
        return {"id": file_id, "object": "file", "bytes": len(parts["file"]), "purpose": "batch"}

    def create_batch(self, body: dict) -> tuple[int, dict]:
        with self.lock:
            if self.create_status:
                return self.create_status.pop(0), {"error": {"message": "scripted"}}
        lines = [json.loads(x) for x in self.files.get(body.get("input_file_id"), b"").decode().splitlines()]
        ids = [x["custom_id"] for x in lines]
        if (body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h" or not lines
                or len(set(ids)) != len(ids) or any(len(i) > 64 for i in ids)
                or any((x["method"], x["url"]) != ("POST", "/v1/chat/completions") for x in lines)):
            return 400, {"error": {"message": f"bad batch {body}"}}
        with self.lock:
            batch_id = f"batch_{len(self.batches)}"
            self.batches[batch_id] = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"],
                                      "input_file_id": body["input_file_id"], "status": "validating",
                                      "output_file_id": None, "error_file_id": None, "errors": None,
                                      "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                                      "_polls": 0}
        return 200, self.public(self.batches[batch_id])

    @staticmethod
    def public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def poll(self, batch_id: str) -> dict:
        with self.lock:
            batch = self.batches[batch_id]
            batch["_polls"] += 1
            if batch["status"] in ("completed", "failed"):
                return self.public(batch)
            if self.fail_batch:
                batch.update(status="failed", errors={"object": "list", "data": [
                    {"code": "invalid_request", "message": self.fail_batch, "line": 1}]})
                return self.public(batch)
            step = ["validating", "in_progress", "finalizing", "completed"]
            nxt = step[min(step.index(batch["status"]) + 1, 3)]
            if self.hold and nxt != "in_progress":
                nxt = "in_progress"
            batch["status"] = nxt
        if nxt == "completed":
            self.run_batch(batch)
        return self.public(batch)

    def run_batch(self, batch: dict) -> None:
        out, err = [], []
        for n, line in enumerate(self.files[batch["input_file_id"]].decode().splitlines()):
            req = json.loads(line)
            self.batch_lines.append(req)
            user = req["body"]["messages"][-1]["content"]
            action = self.next_action(user) or ("content", self.answer(user))
            head = {"id": f"{batch['id']}_req_{n}", "custom_id": req["custom_id"]}
            if action[0] in ("status", "echo_auth"):
                err.append({**head, "response": {"status_code": action[1], "request_id": f"r{n}",
                                                 "body": {"error": {"message": "scripted"}}}, "error": None})
            elif action[0] == "batch_error":
                err.append({**head, "response": None, "error": {"code": action[1], "message": "scripted"}})
            elif action[0] == "content":
                out.append({**head, "response": {"status_code": 200, "request_id": f"r{n}",
                                                 "body": self.completion(action[1])}, "error": None})
        with self.lock:
            for name, rows in (("output_file_id", out), ("error_file_id", err)):
                if rows:
                    file_id = f"file-{len(self.files)}"
                    self.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                    batch[name] = file_id
            batch["request_counts"].update(completed=len(out), failed=len(err))


def make_handler(fake: FakeLLM):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the client may reuse a connection
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

        def setup(self):
            super().setup()
            with fake.lock:
                fake.connections += 1

        def log_message(self, *args):
            pass

        def send(self, code, payload: bytes, headers=None):
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):
            with fake.lock:
                fake.calls.append(("GET", self.path))
            batch = re.fullmatch(r"/v1/batches/(\w+)", self.path)
            content = re.fullmatch(r"/v1/files/([\w-]+)/content", self.path)
            if batch and batch.group(1) in fake.batches:
                self.send(200, json.dumps(fake.poll(batch.group(1))).encode())
            elif content and content.group(1) in fake.files:
                self.send(200, fake.files[content.group(1)])
            else:
                self.send(404, b'{"error": "no such object"}')

        def do_POST(self):
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            with fake.lock:
                fake.calls.append(("POST", self.path))
            if self.path == "/v1/files":
                self.send(200, json.dumps(fake.upload(self.headers["Content-Type"], raw)).encode())
                return
            if self.path == "/v1/batches":
                code, answer = fake.create_batch(json.loads(raw))
                self.send(code, json.dumps(answer).encode())
                return
            body = json.loads(raw)
            with fake.lock:
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                fake.active += 1
                fake.max_active = max(fake.max_active, fake.active)
            try:
                time.sleep(fake.delay)
                user = body["messages"][-1]["content"]
                action = fake.next_action(user) or ("content", fake.answer(user))
                if action[0] == "status":
                    self.send(action[1], b'{"error": "scripted"}', action[2] if len(action) > 2 else None)
                elif action[0] == "echo_auth":
                    self.send(action[1], json.dumps({"error": f"bad {self.headers['Authorization']}"}).encode())
                elif action[0] == "sleep":
                    time.sleep(action[1])
                    self.send(200, b"{}")
                else:
                    self.send(200, json.dumps(fake.completion(action[1])).encode())
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)
            finally:
                with fake.lock:
                    fake.active -= 1

    return Handler


@pytest.fixture
def server():
    fake = FakeLLM()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("SAPRETRAIN_TEST_KEY", KEY)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def config(server, tmp_path, **kw) -> LLMConfig:
    base = dict(base_url=server.url, model="test-model", api_key_env="SAPRETRAIN_TEST_KEY", max_concurrency=4,
                max_retries=3, backoff_base_s=0.001, backoff_max_s=0.01, timeout_s=5.0,
                cache_dir=str(tmp_path / "cache"), price_per_1k_prompt=0.5, price_per_1k_completion=2.0)
    return LLMConfig(**{**base, **kw})


def msgs(i: int) -> list[dict]:
    return [{"role": "system", "content": "Answer with JSON."}, {"role": "user", "content": f"item{i:02d}\nwhat?"}]


REQUIRED = {"label": int, "reason": str}


# --- pieces ---------------------------------------------------------------------------------

def test_prompts_parsing_and_config():
    m = render_prompt("configs/curation/prompts.yaml", "label_triplet", caption="the cat is under the table",
                      subj="cat", rel="under", obj="table")
    assert [x["role"] for x in m] == ["system", "user"]
    assert 'subject "cat", relation "under", object "table"' in m[1]["content"]
    assert '{"label": 1 or 0' in m[0]["content"]  # JSON examples are not placeholders
    with pytest.raises(KeyError, match="obj"):
        render_prompt("configs/curation/prompts.yaml", "negative", caption="c", subj="s", rel="r")
    assert parse_json_object('{"a": 1}') == {"a": 1}
    assert parse_json_object('Here:\n```json\n{"a": [1, 2]}\n```\nbye') == {"a": [1, 2]}
    assert parse_json_object('sure! {"a": "}"} hope that helps') == {"a": "}"}
    check_required({"label": 0, "reason": "x"}, REQUIRED)
    for bad in ({"label": True, "reason": "x"}, {"label": "1", "reason": "x"}, {"reason": "x"}):
        with pytest.raises(Exception):
            check_required(bad, REQUIRED)
    cfg = load_llm_config("configs/curation/llm.yaml", ["max_concurrency=2"])
    assert cfg.max_concurrency == 2 and cfg.api_key_env == "OPENAI_API_KEY"


def test_missing_key_env_fails_fast(monkeypatch, server, tmp_path):
    monkeypatch.delenv("SAPRETRAIN_TEST_KEY")
    with pytest.raises(ValueError, match="SAPRETRAIN_TEST_KEY"):
        LLMClient(config(server, tmp_path))


# --- client behaviour -----------------------------------------------------------------------

def test_retries_recover_and_order_is_kept(server, tmp_path, caplog):
    server.plan = {
        "item01": [("status", 429, {"Retry-After": "1"})],
        "item02": [("status", 500)],
        "item03": [("sleep", 1.0)],  # longer than timeout_s
        "item04": [("content", "I think the label is 1")],
        "item05": [("content", '{"label": 1}')],
        "item06": [("status", 503), ("content", '```json\n{"label": 0, "reason": "fenced"}\n```')],
    }
    client = LLMClient(config(server, tmp_path, timeout_s=0.4))
    start = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        out = client.map_json([msgs(i) for i in range(10)], REQUIRED)
    assert time.monotonic() - start >= 1.0  # Retry-After honoured
    assert [o["reason"] for o in out if o["label"] == 1] == [f"item{i:02d}" for i in range(10) if i != 6]
    assert out[6] == {"label": 0, "reason": "fenced"}
    s = client.stats
    assert (s["items"], s["retries"], s["failures"], s["requests"]) == (10, 6, 0, 16)
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert server.requests[0]["body"]["model"] == "test-model"
    assert {r["auth"] for r in server.requests} == {f"Bearer {KEY}"}
    assert "retry" in caplog.text and KEY not in caplog.text


def test_failures_are_per_item_and_key_never_leaks(server, tmp_path, caplog):
    server.plan = {"item02": [("echo_auth", 500)] * 3, "item05": [("content", "not json")] * 3,
                   "item07": [("content", '{"label": "yes", "reason": "x"}')] * 3}
    client = LLMClient(config(server, tmp_path, max_retries=2))
    with caplog.at_level(logging.DEBUG):
        out = client.map_json([msgs(i) for i in range(9)], REQUIRED)
    failed = {i: o for i, o in enumerate(out) if isinstance(o, LLMError)}
    assert {i: e.kind for i, e in failed.items()} == {2: "http_500", 5: "bad_json", 7: "bad_type"}
    assert all(o["reason"] == f"item{i:02d}" for i, o in enumerate(out) if i not in failed)
    assert "***" in str(failed[2])  # the server quoted the key back: redacted
    s = client.stats
    assert s["failures"] == 3 and s["failures_by_kind"] == {"bad_json": 1, "bad_type": 1, "http_500": 1}
    texts = [str(e) for e in failed.values()] + [repr(e) for e in failed.values()]
    texts += [json.dumps(s), format_stats(s), caplog.text, repr(client)]
    texts += [p.read_bytes().decode("utf-8", "replace") for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not any(KEY in t for t in texts)


def test_fatal_status_stops_the_batch(server, tmp_path):
    server.plan = {"item00": [("status", 401)]}
    with pytest.raises(LLMFatalError, match="401") as info:
        LLMClient(config(server, tmp_path, max_concurrency=1)).map_json([msgs(i) for i in range(20)], REQUIRED)
    assert KEY not in str(info.value)
    assert len(server.requests) == 1  # the queued items were not sent


def test_cache_makes_a_rerun_free(server, tmp_path):
    cfg = config(server, tmp_path)
    first = LLMClient(cfg).map_json([msgs(i) for i in range(5)] + [msgs(0)], REQUIRED)
    assert len(server.requests) == 5  # the duplicate was sent once
    assert len(AnswerCache(tmp_path / "cache")) == 5
    assert [p.name for p in (tmp_path / "cache").glob("*.sqlite")] == [CACHE_FILE]  # one file, not one per answer
    assert not list((tmp_path / "cache").rglob("*.json"))
    again = LLMClient(cfg)
    assert again.map_json([msgs(i) for i in range(5)] + [msgs(0)], REQUIRED) == first
    assert len(server.requests) == 5
    s = again.stats
    assert (s["requests"], s["cache_hits"], s["prompt_tokens"], s["cost_usd"]) == (0, 5, 0, 0.0)
    # Another model or temperature is another key.
    LLMClient(config(server, tmp_path, temperature=0.7)).complete_json(msgs(0), REQUIRED)
    assert len(server.requests) == 6


def test_concurrency_bound(server, tmp_path):
    server.delay = 0.05
    client = LLMClient(config(server, tmp_path, max_concurrency=3, cache_dir=None))
    out = client.map_json([msgs(i) for i in range(15)], REQUIRED)
    assert len(out) == 15 and not any(isinstance(o, LLMError) for o in out)
    assert 2 <= server.max_active <= 3


def test_cost_accounting(server, tmp_path):
    server.plan = {"item01": [("content", "garbage")]}  # a paid-for answer that is retried
    client = LLMClient(config(server, tmp_path))
    client.map_json([msgs(i) for i in range(4)], REQUIRED)
    s = client.stats
    assert (s["requests"], s["prompt_tokens"], s["completion_tokens"]) == (5, 150, 35)
    assert s["cost_usd"] == pytest.approx(150 / 1000 * 0.5 + 35 / 1000 * 2.0)  # 0.145
    assert "$0.1450" in format_stats(s)


# --- connection pool ------------------------------------------------------------------------

def test_connections_are_pooled_and_reused(server, tmp_path):
    client = LLMClient(config(server, tmp_path, max_concurrency=3, cache_dir=None))
    out = client.map_json([msgs(i) for i in range(30)], REQUIRED)
    assert not any(isinstance(o, LLMError) for o in out) and len(server.requests) == 30
    assert 1 <= server.connections <= 3  # at most the pool size, not one per request
    client.map_json([msgs(i) for i in range(30, 40)], REQUIRED)
    assert server.connections <= 3  # kept alive between calls
    client.close()
    before = server.connections
    with LLMClient(config(server, tmp_path, max_concurrency=4, max_connections=1, cache_dir=None)) as one:
        assert len(one.map_json([msgs(i) for i in range(12)], REQUIRED)) == 12
    assert server.connections - before == 1 and len(server.requests) == 52


# --- SQLite cache ---------------------------------------------------------------------------

SHARED = """
import json, sys
from sapretrain.curation.llm import AnswerCache, LLMClient, LLMConfig
cfg, lo, hi, tag = LLMConfig(**json.loads(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
msgs = [[{"role": "system", "content": "Answer with JSON."}, {"role": "user", "content": f"item{i:02d}\\nwhat?"}]
        for i in range(lo, hi)]
with LLMClient(cfg) as client:
    assert not any(isinstance(a, Exception) for a in client.map_json(msgs, {"label": int, "reason": str}))
cache = AnswerCache(cfg.cache_dir)
for i in range(300):  # one write transaction each, both processes at once
    cache.put_many("m", [(f"{tag}-{i}", "{}")])
"""


def _config_json(cfg: LLMConfig) -> str:
    import dataclasses
    return json.dumps(dataclasses.asdict(cfg))


def test_sqlite_cache_is_shared_by_processes(server, tmp_path):
    cfg = config(server, tmp_path, max_concurrency=2)
    procs = [subprocess.Popen([sys.executable, "-c", SHARED, _config_json(cfg), str(lo), str(hi), tag])
             for lo, hi, tag in ((0, 20, "a"), (10, 30, "b"))]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert 30 <= len(server.requests) <= 40  # the overlap may be asked by both
    assert len(AnswerCache(cfg.cache_dir)) == 30 + 600
    client = LLMClient(cfg)
    out = client.map_json([msgs(i) for i in range(30)], REQUIRED)
    assert [o["reason"] for o in out] == [f"item{i:02d}" for i in range(30)]
    assert (client.stats["cache_hits"], client.stats["requests"]) == (30, 0)


def test_old_file_cache_is_read_and_migrated(server, tmp_path):
    cfg = config(server, tmp_path)
    key = LLMClient(cfg).cache_key(msgs(0))
    old = tmp_path / "cache" / key[:2] / f"{key}.json"  # the layout of the file-per-answer cache
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps({"model": "test-model", "content": json.dumps({"label": 0, "reason": "old"})}))
    client = LLMClient(cfg)
    assert client.map_json([msgs(0), msgs(1)], REQUIRED)[0] == {"label": 0, "reason": "old"}
    assert len(server.requests) == 1 and client.stats["cache_hits"] == 1
    old.unlink()
    assert LLMClient(cfg).complete_json(msgs(0), REQUIRED) == {"label": 0, "reason": "old"}  # now in SQLite
    assert len(server.requests) == 1


# --- Batch API mode -------------------------------------------------------------------------

def batch_config(server, tmp_path, **kw) -> LLMConfig:
    return config(server, tmp_path, **{"mode": "batch", "batch_poll_s": 0.01, **kw})


def _label_0_or_1(answer: dict) -> str | None:
    return None if answer["label"] in (0, 1) else "label must be 0 or 1"


def _users(upload: dict) -> list[str]:
    return sorted(json.loads(x)["body"]["messages"][-1]["content"][:6] for x in upload["lines"])


def test_batch_mode_end_to_end(server, tmp_path):
    server.plan = {"item01": [("status", 500)],                    # a failed line: in the second batch
                   "item02": [("content", '{"label": 1}')],         # missing key: again
                   "item03": [("batch_error", "batch_expired")],    # not run: again
                   "item04": [("drop",)],                           # in neither file: again
                   "item05": [("content", '{"label": 2, "reason": "x"}')] * 9,  # never valid: rejected
                   "item06": [("status", 400)]}                     # a 4xx line fails at once
    client = LLMClient(batch_config(server, tmp_path, batch_online_fallback=False))
    out = client.map_json([msgs(i) for i in range(8)] + [msgs(0)], REQUIRED, _label_0_or_1)
    assert [o.kind if isinstance(o, LLMError) else o["reason"] for o in out] == [
        "item00", "item01", "item02", "item03", "item04", "invalid", "http_400", "item07", "item00"]
    assert server.requests == []  # nothing online
    assert [len(u["lines"]) for u in server.uploads] == [8, 5] and list(server.batches) == ["batch_0", "batch_1"]
    assert _users(server.uploads[1]) == ["item01", "item02", "item03", "item04", "item05"]
    line = json.loads(server.uploads[0]["lines"][0])
    assert set(line) == {"custom_id", "method", "url", "body"} and line["body"]["model"] == "test-model"
    assert line["body"]["response_format"] == {"type": "json_object"}
    s = client.stats
    assert (s["items"], s["batches"], s["requests"], s["retries"], s["failures"]) == (8, 2, 13, 5, 2)
    assert s["failures_by_kind"] == {"http_400": 1, "invalid": 1}
    # 9 answered lines (4 in the first batch, 5 in the second), at half the online price
    assert s["prompt_tokens"] == 9 * 30 and s["cost_usd"] == pytest.approx(9 * (30 * 0.5 + 7 * 2.0) / 1000 / 2)
    assert "in 2 batches" in format_stats(s)
    # A re-run asks only what is not cached, in one new batch.
    again = LLMClient(batch_config(server, tmp_path, batch_online_fallback=False))
    out = again.map_json([msgs(i) for i in range(8)], REQUIRED, _label_0_or_1)
    assert [o.kind if isinstance(o, LLMError) else o["label"] for o in out] == [1, 1, 1, 1, 1, "invalid", 1, 1]
    assert _users(server.uploads[2]) == ["item05", "item06"] and again.stats["cache_hits"] == 6


def test_batch_failures_fall_back_online(server, tmp_path):
    server.plan = {"item01": [("content", "no json")] * 2}  # the batch line, then the first online try
    client = LLMClient(batch_config(server, tmp_path, batch_rounds=1))
    out = client.map_json([msgs(i) for i in range(3)], REQUIRED)
    assert [o["reason"] for o in out] == ["item00", "item01", "item02"]
    assert len(server.uploads) == 1 and len(server.requests) == 2
    assert client.stats["retries"] == 2 and client.stats["failures"] == 0


def test_batch_failed_validation_is_fatal(server, tmp_path):
    server.fail_batch = "model test-model is not available for batch"
    with pytest.raises(LLMFatalError, match="not available for batch") as info:
        LLMClient(batch_config(server, tmp_path)).map_json([msgs(i) for i in range(3)], REQUIRED)
    assert info.value.kind == "batch_failed" and KEY not in str(info.value)
    server.fail_batch = None
    out = LLMClient(batch_config(server, tmp_path)).map_json([msgs(i) for i in range(3)], REQUIRED)
    assert len(out) == 3 and len(server.uploads) == 2  # a failed batch is not re-attached to


KILLED = """
import json, sys
from sapretrain.curation.llm import LLMClient, LLMConfig
LLMClient(LLMConfig(**json.loads(sys.argv[1]))).map_json(json.loads(sys.argv[2]), {"label": int, "reason": str})
"""


def test_batch_resume_reattaches_after_a_kill(server, tmp_path):
    # Stopped by batch_max_wait_s while the batch runs: the next run re-attaches to it.
    server.hold = True
    with pytest.raises(LLMFatalError, match="re-attach") as info:
        LLMClient(batch_config(server, tmp_path, batch_max_wait_s=0.1)).map_json([msgs(i) for i in range(4)], REQUIRED)
    assert info.value.kind == "batch_timeout" and len(server.uploads) == 1 and list(server.batches) == ["batch_0"]
    server.hold = False
    client = LLMClient(batch_config(server, tmp_path))
    assert [o["reason"] for o in client.map_json([msgs(i) for i in range(4)], REQUIRED)] == [
        f"item{i:02d}" for i in range(4)]
    assert len(server.uploads) == 1 and list(server.batches) == ["batch_0"]  # nothing sent twice
    assert client.stats["batches"] == 0 and client.stats["prompt_tokens"] == 4 * 30

    # Killed (SIGKILL) while it waits: the resumed run polls the same batch, without a second upload.
    server.hold = True
    cfg = batch_config(server, tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", KILLED, _config_json(cfg), json.dumps([msgs(i) for i in range(10, 14)])])
    deadline = time.monotonic() + 30
    while not (len(server.batches) == 2 and server.batches["batch_1"]["_polls"] >= 2) and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert len(server.uploads) == 2 and server.batches["batch_1"]["status"] == "in_progress"
    server.hold = False
    out = LLMClient(cfg).map_json([msgs(i) for i in range(10, 14)], REQUIRED)
    assert [o["reason"] for o in out] == [f"item{i:02d}" for i in range(10, 14)]
    assert len(server.uploads) == 2 and list(server.batches) == ["batch_0", "batch_1"]

    # Killed between the upload and the batch creation (here: the create gives up): the file is reused.
    server.create_status = [500] * 4
    with pytest.raises(LLMFatalError, match="batches"):
        LLMClient(cfg).map_json([msgs(i) for i in range(20, 22)], REQUIRED)
    assert len(server.uploads) == 3 and len(server.batches) == 2
    assert len(LLMClient(cfg).map_json([msgs(i) for i in range(20, 22)], REQUIRED)) == 2
    assert len(server.uploads) == 3 and len(server.batches) == 3


def test_batch_config_checks(tmp_path):
    with pytest.raises(ValueError, match="cache_dir"):
        load_llm_config("configs/curation/llm.yaml", ["mode=batch", "cache_dir=null"])
    with pytest.raises(ValueError, match="mode"):
        load_llm_config("configs/curation/llm.yaml", ["mode=bulk"])
    cfg = load_llm_config("configs/curation/llm.yaml", ["mode=batch"])
    assert (cfg.batch_completion_window, cfg.batch_rounds, cfg.batch_price_factor) == ("24h", 2, 0.5)


# --- the two tasks --------------------------------------------------------------------------

def triplet(caption, subj, rel, obj):
    def span(text):
        start = caption.index(text)
        return {"text": text, "start": start, "end": start + len(text)}
    return {"subj": span(subj), "rel": {**span(rel), "kind": "spatial"}, "obj": span(obj)}


SAMPLES = [{"caption": c, "triplet": triplet(c, *t)} for c, t in [
    ("the cat is under the table", ("cat", "under", "table")),
    ("a man to the left of a horse", ("man", "to the left of", "horse")),
    ("a dog in front of a car", ("dog", "in front of", "car")),
]]


def test_label_triplets(server, tmp_path):
    def answer(user):
        return json.dumps({"label": 0 if "horse" in user else 1, "reason": "because"})
    server.answer = answer
    server.plan = {"cat": [("content", '{"label": 2, "reason": "?"}')],  # out of range: asked again
                   "dog": [("content", "no")] * 4}
    client = LLMClient(config(server, tmp_path))
    assert label_triplets(client, SAMPLES) == [{"label": 1, "reason": "because"},
                                               {"label": 0, "reason": "because"}, None]
    user = server.requests[0]["body"]["messages"][1]["content"]
    assert 'relation "' in user and server.requests[0]["body"]["response_format"] == {"type": "json_object"}


def test_generate_negatives(server, tmp_path):
    server.answer = lambda user: json.dumps({"negative": "the cat is on the table"})
    server.plan = {"horse": [("content", '{"negative": "a man to the right of a horse"}')],
                   "dog": [("content", '{"negative": "a dog behind a truck"}')] * 4}  # object changed
    client = LLMClient(config(server, tmp_path))
    assert generate_negatives_llm(client, SAMPLES) == ["the cat is on the table", "a man to the right of a horse",
                                                       None]
    assert client.stats["failures_by_kind"] == {"invalid": 1}


# --- label_seeds ----------------------------------------------------------------------------

def write_triplets(path, n=6):
    lines = []
    for i in range(n):
        c = f"cat{i} under table{i} and dog{i} near car{i}"
        lines.append({"id": f"coco-{i}", "caption": c, "source": "coco" if i != 3 else "vg",
                      "triplets": [triplet(c, f"cat{i}", "under", f"table{i}"), triplet(c, f"dog{i}", "near", f"car{i}")]})
    lines.insert(2, {"id": "empty", "caption": "a black cat", "source": "coco", "triplets": []})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    return str(path)


def test_sample_seeds_is_deterministic(tmp_path):
    src = write_triplets(tmp_path / "t.jsonl")
    everything = sample_seeds(src)
    assert len(everything) == 12 and everything[1]["id"] == "coco-0-t1"
    a = sample_seeds(src, sample=5, seed=1)
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    (tmp_path / "r.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    assert {x["id"] for x in sample_seeds(str(tmp_path / "r.jsonl"), sample=5, seed=1)} == {x["id"] for x in a}
    assert [x["id"] for x in a] == sorted((x["id"] for x in a), key=[y["id"] for y in everything].index)
    assert {x["id"] for x in sample_seeds(src, sample=5, seed=2)} != {x["id"] for x in a}
    assert all(not x["id"].startswith("coco-3-") for x in sample_seeds(src, source="coco"))


def test_label_seeds_end_to_end_with_resume(server, tmp_path, capsys):
    from tools.label_seeds import main

    src = write_triplets(tmp_path / "triplets.jsonl")
    (tmp_path / "llm.yaml").write_text(
        f"base_url: {server.url}\nmodel: test-model\napi_key_env: SAPRETRAIN_TEST_KEY\nmax_retries: 1\n"
        "backoff_base_s: 0.001\nbackoff_max_s: 0.01\ncache_dir: null\nprice_per_1k_prompt: 1.0\n")
    server.answer = lambda user: json.dumps({"label": 0 if 'subject "dog' in user else 1, "reason": "r"})

    def run(out):
        return main(["--input", src, "--output", str(out), "--config", str(tmp_path / "llm.yaml"), "--source", "coco",
                     "--sample", "8", "--seed", "3", "--chunk-size", "3", "--no-progress"])

    server.plan = {'subject "dog5"': [("content", "broken")] * 2}
    assert run(tmp_path / "ref" / "labels.jsonl") == 0
    printed = capsys.readouterr().out
    assert "dropped: llm_bad_json 1" in printed and "llm: 8 items" in printed and "$0.2700" in printed
    ref = (tmp_path / "ref" / "labels.jsonl").read_bytes()
    rows = [json.loads(x) for x in ref.splitlines()]
    assert len(rows) == 7 and set(rows[0]) == {"id", "caption", "triplet", "label", "reason", "labeler"}
    assert rows[0]["labeler"] == "llm:test-model"
    assert all(r["label"] == (0 if "dog" in r["triplet"]["subj"]["text"] else 1) for r in rows)
    (dropped,) = [json.loads(x) for x in open(dropped_output(str(tmp_path / "ref" / "labels.jsonl")))]
    assert dropped["id"] == "coco-5-t1" and dropped["drop_reason"] == "llm_bad_json"

    # A crash (the server rejects the key) in the second chunk, then a resume.
    seeds = [json.loads(x) for x in open(tmp_path / "ref" / "labels.seeds.jsonl")]
    marker = f'subject "{seeds[4]["triplet"]["subj"]["text"]}"'
    server.plan = {'subject "dog5"': [("content", "broken")] * 2, marker: [("status", 401)]}
    out = tmp_path / "run" / "labels.jsonl"
    before = len(server.requests)
    assert run(out) == 1 and not out.exists()
    assert len(list((tmp_path / "run" / "labels.jsonl.chunks").glob("????????.jsonl"))) == 1  # chunk 0 committed
    mid = len(server.requests)
    assert run(out) == 0
    assert out.read_bytes() == ref
    assert len(server.requests) - mid == 8 - 3 + 1  # the first chunk is not asked again; dog5 retried once
    assert mid - before <= 6


def test_label_seeds_in_batch_mode_matches_online(server, tmp_path, capsys):
    from tools.label_seeds import main

    src = write_triplets(tmp_path / "triplets.jsonl")
    (tmp_path / "llm.yaml").write_text(
        f"base_url: {server.url}\nmodel: test-model\napi_key_env: SAPRETRAIN_TEST_KEY\nmax_retries: 1\n"
        f"backoff_base_s: 0.001\nbackoff_max_s: 0.01\ncache_dir: {tmp_path / 'cache'}\nbatch_poll_s: 0.01\n")
    server.answer = lambda user: json.dumps({"label": 0 if 'subject "dog' in user else 1, "reason": "r"})

    def run(out, *overrides):
        return main(["--input", src, "--output", str(out), "--config", str(tmp_path / "llm.yaml"), "--sample", "8",
                     "--chunk-size", "3", "--no-progress", *overrides])

    assert run(tmp_path / "online" / "labels.jsonl", "cache_dir=null") == 0
    assert len(server.requests) == 8 and not server.uploads
    assert run(tmp_path / "batch" / "labels.jsonl", "mode=batch") == 0
    assert len(server.requests) == 8 and len(server.uploads) == 3  # one batch per chunk, nothing online
    assert "in 3 batches" in capsys.readouterr().out
    assert (tmp_path / "batch" / "labels.jsonl").read_bytes() == (tmp_path / "online" / "labels.jsonl").read_bytes()
