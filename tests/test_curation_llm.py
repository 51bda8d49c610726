"""The LLM client against a real local chat-completions server: retries, failures per item, order,
cache, key hygiene, concurrency bound, cost; the two tasks; label_seeds end to end with resume."""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sapretrain.curation.llm import (LLMClient, LLMConfig, LLMError, LLMFatalError, check_required,
                                     format_stats, generate_negatives_llm, label_triplets, load_llm_config,
                                     parse_json_object, render_prompt, sample_seeds)
from sapretrain.curation.stage import dropped_output

KEY = "sk-test-DO-NOT-LEAK-4242"
USAGE = {"prompt_tokens": 30, "completion_tokens": 7}


class FakeLLM:
    """A chat-completions server. By default it answers each request with ``answer(user_text)``;
    ``plan[marker]`` is a list of actions used, one per request, for requests whose user message
    contains ``marker``: ``("status", code, headers)``, ``("sleep", s)``, ``("content", text)``,
    ``("echo_auth", code)`` (an error body quoting the Authorization header)."""

    def __init__(self):
        self.plan: dict[str, list] = {}
        self.requests: list[dict] = []
        self.active = self.max_active = 0
        self.delay = 0.0
        self.lock = threading.Lock()
        self.answer = lambda user: json.dumps({"label": 1, "reason": user.split("\n")[0]})

    def next_action(self, user: str):
        with self.lock:
            for marker, actions in self.plan.items():
                if marker in user and actions:
                    return actions.pop(0)
        return None


def make_handler(fake: FakeLLM):
    class Handler(BaseHTTPRequestHandler):
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

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
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
                    self.send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": action[1]}}],
                                               "usage": USAGE}).encode())
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
    texts += [p.read_text() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
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
    files = list((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 5 and not list((tmp_path / "cache").rglob("*.tmp"))
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
