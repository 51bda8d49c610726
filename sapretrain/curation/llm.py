"""An OpenAI-compatible chat-completions client for curation, and the two LLM tasks (paper §2.1, App. A).

    cfg = load_llm_config("configs/curation/llm.yaml", ["model=gpt-4o-mini"])   # mode=batch: Batch API
    with LLMClient(cfg) as client:
        labels = label_triplets(client, samples)             # [{"label": 0|1, "reason": str} | None]
        negatives = generate_negatives_llm(client, samples)  # [str | None]
        print(format_stats(client.stats))

**Online mode** (``mode: online``). ``POST {base_url}/chat/completions`` through one pooled
``httpx.Client`` per LLMClient: keep-alive connections (``max_connections``, default
``max_concurrency``; idle ones closed after ``keepalive_expiry_s``), so N requests open at most
the pool size of TCP/TLS connections instead of N. At most ``max_concurrency`` requests are in
flight per client (a semaphore, so it also holds across concurrent ``map_json`` calls). The API
key is read from the environment variable *named* by ``api_key_env`` and sent as
``Authorization: Bearer``; it is never stored in the config, the cache, the stats, a log line or
an exception.

**Batch mode** (``mode: batch``, the OpenAI Batch API, half price, answers within 24 h).
``map_json`` writes the requests not in the cache as JSONL lines ``{"custom_id": <cache key>,
"method": "POST", "url": "/v1/chat/completions", "body": …}`` (at most ``batch_max_requests`` per
batch), uploads them (``POST /files``, ``purpose=batch``), creates the batch (``POST /batches``,
``completion_window`` 24h), polls ``GET /batches/{id}`` every ``batch_poll_s`` (validating,
in_progress, finalizing, cancelling → completed, expired, cancelled, failed) for at most
``batch_max_wait_s``, then downloads the output and error files (``GET /files/{id}/content``).
Each answer line (``custom_id``, ``response.status_code``, ``response.body``, ``error``) goes
through the same checks as an online answer. Lines that failed (an ``error``, 429/5xx, an answer
that is not valid, a line missing from both files) are sent again in a further batch, up to
``batch_rounds`` batches in all, then online if ``batch_online_fallback`` (with the online retries);
other 4xx lines fail their item. A batch that ``failed`` (validation) raises ``LLMFatalError``.
**Resume**: the file id and the batch id are written to the cache database as soon as they
exist, with the request keys they hold; a run killed while a batch is in flight (or stopped by
``batch_max_wait_s``, which raises ``LLMFatalError`` kind ``batch_timeout``) re-attaches to it on
the next run: nothing is uploaded or created twice.

**Redaction** (``redact``): a server (or a proxy) may quote the request back, in an error body, a
non-JSON answer or inside the JSON answer itself. Everything the client records passes one
function first: the raw response text before it is cut for a message, the assistant content
before it is parsed, every string of the parsed answer (after JSON unescaping, so an answer
spelling the key as ``\\u0073k-…`` is caught too) and every error message. It replaces the key's
value and the value of any ``Authorization`` / ``Proxy-Authorization`` / ``api-key`` /
``x-api-key`` header or ``Bearer`` token with ``***``. So labels, negatives, the cache (which
stores the redacted answer), log lines, ``drop_detail`` (the dropped-lines file and the stage
summary's examples) never hold it.

**Retries.** 429, 5xx, timeouts, connection errors and unreadable responses are retried with
exponential backoff and jitter (``backoff_base_s * 2**attempt``, capped at ``backoff_max_s``,
times a random factor in [0.5, 1]); a ``retry-after-ms`` / ``Retry-After`` header is honoured as a
lower bound. An assistant message that is not a JSON object with the required keys and types is
retried too (the model is asked again). After ``max_retries`` retries the *item* fails with an
``LLMError`` carrying a ``kind`` (``http_429``, ``http_500``, ``timeout``, ``connection``,
``bad_response``, ``bad_json``, ``missing_key``, ``bad_type``, ``invalid``, ``http_400``,
``batch_expired`` …) and the other items of the batch are unaffected. 401/403/404 mean the key,
model or URL is wrong for every item, so they raise ``LLMFatalError`` out of the batch instead of
failing a million items one by one. The batch-mode calls (upload, create, poll, download) are
retried the same way and raise ``LLMFatalError`` when they give up (a re-run re-attaches).

**Cache** (``AnswerCache``). With ``cache_dir`` set, each *validated* (redacted) answer is stored
in one SQLite file, ``cache_dir/llm_cache.sqlite`` (WAL journal, busy timeout), keyed by sha256
of (base_url, model, messages, temperature): threads, processes and ``--part`` jobs on one machine
(or one local disk) share it; a re-run answers from it without HTTP requests. It also holds the
in-flight batches. An older file-per-answer cache (``cache_dir/ab/abcdef….json``) in the same
folder is read as a fallback on a miss, and each answer read that way is copied into SQLite (lazy
migration; the files are left in place). Identical requests inside one batch are sent once.
SQLite's WAL needs a local file system: do not put ``cache_dir`` on NFS.

**Accounting.** ``client.stats``: ``items``, ``requests`` (HTTP attempts and batch lines sent),
``retries``, ``failures``, ``failures_by_kind``, ``cache_hits``, ``batches``, ``prompt_tokens``,
``completion_tokens`` (from each response's ``usage``, also for answers that failed validation:
they were paid for) and ``cost_usd`` = tokens / 1000 × ``price_per_1k_prompt`` /
``price_per_1k_completion`` (× ``batch_price_factor`` for batch answers).

**Prompts** live in ``configs/curation/prompts.yaml`` (``render_prompt``), not in this module.
"""
from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

try:
    import httpx
except ImportError as e:  # part of the curation extra
    raise ImportError("the LLM client needs httpx: pip install 'sapretrain[curation]' (or httpx)") from e

from sapretrain.config import load_config, read_yaml

log = logging.getLogger(__name__)

FATAL_STATUS = (401, 403, 404)  # wrong key, model or URL: the same for every item
MODES = ("online", "batch")
BATCH_RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
BATCH_DONE = ("completed", "expired", "cancelled", "failed")


@dataclass
class LLMConfig:
    base_url: str = "https://api.openai.com/v1"  # OpenAI-compatible root (vLLM: http://host:8000/v1)
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var holding the key; "" = send no key
    mode: str = "online"  # online: one request per item | batch: the Batch API (upload, poll, download)
    max_concurrency: int = 8  # requests in flight per client
    max_connections: int | None = None  # keep-alive pool size; null = max_concurrency
    keepalive_expiry_s: float = 30.0  # an idle pooled connection is closed after this
    max_retries: int = 4  # retries after the first attempt (HTTP errors and malformed answers alike)
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 60.0  # per request (connect and each read)
    temperature: float = 0.0
    max_tokens: int = 256
    json_mode: bool = True  # send response_format={"type": "json_object"}
    cache_dir: str | None = ".cache/llm"  # folder of llm_cache.sqlite; null = no cache (online only)
    prompts: str = "configs/curation/prompts.yaml"  # a path, or a configs/ name shipped with the package
    price_per_1k_prompt: float = 0.0  # USD per 1,000 prompt tokens (cost estimate only)
    price_per_1k_completion: float = 0.0
    batch_completion_window: str = "24h"  # the only window OpenAI offers
    batch_max_requests: int = 50000  # lines per batch (OpenAI: 50,000 and 200 MB per input file)
    batch_poll_s: float = 30.0  # seconds between two GET /batches/{id}
    batch_max_wait_s: float = 90000.0  # then LLMFatalError(batch_timeout); a re-run re-attaches
    batch_rounds: int = 2  # batches per map_json: the first, then one more for the failed lines
    batch_online_fallback: bool = True  # lines still failed after batch_rounds are asked online
    batch_price_factor: float = 0.5  # Batch API price relative to online (OpenAI: half)


def load_llm_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LLMConfig:
    return check_llm_config(load_config(LLMConfig, path, overrides))


def check_llm_config(cfg: LLMConfig) -> LLMConfig:
    if cfg.max_concurrency < 1 or cfg.max_retries < 0 or cfg.timeout_s <= 0:
        raise ValueError("llm config: need max_concurrency >= 1, max_retries >= 0, timeout_s > 0")
    if cfg.mode not in MODES:
        raise ValueError(f"llm config: mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.max_connections is not None and cfg.max_connections < 1:
        raise ValueError(f"llm config: max_connections must be >= 1 or null, got {cfg.max_connections}")
    if cfg.mode == "batch":
        if not cfg.cache_dir:
            raise ValueError("llm config: mode batch needs cache_dir (the batch ids and answers are kept "
                             "there, so a killed run re-attaches to its batches)")
        if cfg.batch_rounds < 1 or cfg.batch_max_requests < 1 or cfg.batch_poll_s <= 0 or cfg.batch_max_wait_s < 0:
            raise ValueError("llm config: need batch_rounds >= 1, batch_max_requests >= 1, batch_poll_s > 0, "
                             "batch_max_wait_s >= 0")
    return cfg


_SECRET_FIELD = re.compile(
    r"(?i)\b((?:proxy-)?authorization|x-api-key|api[-_]?key)(\\?[\"']?\s*[:=]\s*\\?[\"']?\s*)"
    r"((?:bearer|basic|token)\s+)?[^\s\"'\\,;}&]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{6,}")


def redact(text: str, secrets: tuple[str, ...] | list[str] = ()) -> str:
    """``text`` without the values of ``secrets`` nor of credential headers/tokens (each becomes ``***``)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _SECRET_FIELD.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}***", text)
    return _BEARER.sub(lambda m: f"{m.group(1)}***", text)


def redact_value(value: Any, secrets: tuple[str, ...] | list[str] = ()) -> Any:
    """``redact`` applied to every string (keys included) of a parsed JSON value."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, list):
        return [redact_value(v, secrets) for v in value]
    if isinstance(value, dict):
        return {redact(k, secrets): redact_value(v, secrets) for k, v in value.items()}
    return value


class LLMError(Exception):
    """One item failed: ``kind`` is a short category (counted), the message says what happened."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


class LLMFatalError(LLMError):
    """A failure that would be the same for every item (bad key, model or URL): stops the batch."""


class _Retryable(Exception):
    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.message, self.retry_after = kind, message, retry_after


# --- JSON answers ---------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)


def parse_json_object(content: str) -> dict:
    """The JSON object in an assistant message: bare, in a ```json fence, or the outermost ``{…}``."""
    text = content.strip()
    candidates = [text]
    fence = _FENCE.search(text)
    if fence:
        candidates.append(fence.group(1).strip())
    if "{" in text and "}" in text:
        candidates.append(text[text.index("{"): text.rindex("}") + 1])
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise _Retryable("bad_json", f"no JSON object in the answer: {text[:120]!r}")


def check_required(value: dict, required: dict[str, type | tuple]) -> None:
    """Raise (retryable) unless every required key is present with the given type (bool is not int)."""
    for key, typ in required.items():
        if key not in value:
            raise _Retryable("missing_key", f"answer lacks key {key!r}: {json.dumps(value)[:120]}")
        types = typ if isinstance(typ, tuple) else (typ,)
        item = value[key]
        ok = isinstance(item, types) and not (isinstance(item, bool) and bool not in types)
        ok = ok or (float in types and isinstance(item, int) and not isinstance(item, bool))
        if not ok:
            names = "/".join(t.__name__ for t in types)
            raise _Retryable("bad_type", f"answer key {key!r} should be {names}, got {item!r}")


# --- prompts --------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")  # JSON examples such as {"label": 1} never match


def load_prompts(prompts: str | Path | dict) -> dict:
    if isinstance(prompts, dict):
        return prompts
    return read_yaml(prompts)  # a missing configs/ path falls back to the shipped one; bad YAML: a ConfigError


def render_prompt(prompts_yaml: str | Path | dict, name: str, **variables: Any) -> list[dict]:
    """Chat messages of prompt ``name``: its ``system`` and ``user`` templates with ``{caption}``,
    ``{subj}``, ``{rel}``, ``{obj}`` … filled in. A placeholder without a value raises."""
    prompts = load_prompts(prompts_yaml)
    if name not in prompts:
        raise KeyError(f"no prompt {name!r} in {prompts_yaml if not isinstance(prompts_yaml, dict) else 'prompts'}; "
                       f"have {sorted(prompts)}")

    def fill(template: str) -> str:
        def one(match: re.Match) -> str:
            if match.group(1) not in variables:
                raise KeyError(f"prompt {name!r} needs {{{match.group(1)}}}")
            return str(variables[match.group(1)])
        return _PLACEHOLDER.sub(one, template)

    messages = []
    for role in ("system", "user"):
        if prompts[name].get(role):
            messages.append({"role": role, "content": fill(prompts[name][role]).strip()})
    return messages


# --- the cache ------------------------------------------------------------------------------

CACHE_FILE = "llm_cache.sqlite"
_LEGACY_DIR = re.compile(r"[0-9a-f]{2}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT, content TEXT NOT NULL, created REAL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batch_jobs (job TEXT PRIMARY KEY, input_file_id TEXT, batch_id TEXT,
    state TEXT NOT NULL, n INTEGER, created REAL, updated REAL);
CREATE TABLE IF NOT EXISTS batch_items (key TEXT NOT NULL, job TEXT NOT NULL, PRIMARY KEY (key, job))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batch_items_job ON batch_items (job);
"""


class AnswerCache:
    """Validated answers and in-flight batch jobs in one SQLite file, ``cache_dir/llm_cache.sqlite``.

    WAL journal and a busy timeout: readers never block, writers (single statements, or one
    ``BEGIN IMMEDIATE`` transaction per batch of answers) wait for each other, so the threads of a
    client, several clients and several processes or parts can share the file. One connection
    per instance, guarded by a lock (SQLite calls are microseconds next to an HTTP request)."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / CACHE_FILE
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        with self._lock:
            self._set_wal()
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill
            self._db.executescript(_SCHEMA)
        # An older cache kept one JSON file per answer in cache_dir/ab/<key>.json: read on a miss.
        self._legacy = any(p.is_dir() and _LEGACY_DIR.fullmatch(p.name) for p in self.dir.iterdir())

    def _set_wal(self, wait_s: float = 60.0) -> None:
        """Switch to the WAL journal. SQLite answers "database is locked" at once, without the busy
        handler, when another process opens the same new file at that moment: retried here."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self):
        """One write transaction; IMMEDIATE takes the write lock at once (waiting up to the timeout)
        instead of failing when a read turns into a write while another process writes."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM answers").fetchone()[0]

    # answers

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT content FROM answers WHERE key = ?", (key,)).fetchone()
        if row is not None:
            return row[0]
        if not self._legacy:
            return None
        try:
            old = json.loads((self.dir / key[:2] / f"{key}.json").read_text())
            content = old["content"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or damaged: a miss
        if not isinstance(content, str):
            return None
        self.put_many(old.get("model"), [(key, content)])  # migrated on first read
        return content

    def put_many(self, model: str | None, rows: list[tuple[str, str]]) -> None:
        if not rows:
            return
        now = time.time()
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)", [(k, model, c, now) for k, c in rows])

    # batch jobs: a job is one batch (its input file, then its batch id) and the request keys it holds

    def new_job(self, keys: list[str]) -> str:
        job = uuid.uuid4().hex
        now = time.time()
        with self._transaction() as db:
            db.execute("INSERT INTO batch_jobs VALUES (?, NULL, NULL, 'new', ?, ?, ?)", (job, len(keys), now, now))
            db.executemany("INSERT OR IGNORE INTO batch_items VALUES (?, ?)", [(k, job) for k in keys])
        return job

    def in_flight(self, keys: list[str]) -> dict[str, str]:
        """key → job, for the keys that an unfinished job holds (a run killed while it waited)."""
        found: dict[str, str] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                part = keys[start:start + 500]
                rows = self._db.execute(
                    "SELECT i.key, i.job FROM batch_items i JOIN batch_jobs j ON i.job = j.job "
                    f"WHERE j.state != 'done' AND i.key IN ({','.join('?' * len(part))}) ORDER BY j.created",
                    part).fetchall()
                for key, job in rows:
                    found.setdefault(key, job)
        return found

    def job(self, job: str) -> dict:
        with self._lock:
            row = self._db.execute("SELECT input_file_id, batch_id, state FROM batch_jobs WHERE job = ?",
                                   (job,)).fetchone()
        return dict(zip(("input_file_id", "batch_id", "state"), row)) if row else {}

    def update_job(self, job: str, **fields: str) -> None:
        sets = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE batch_jobs SET {sets}, updated = ? WHERE job = ?",
                             (*fields.values(), time.time(), job))

    def finish_job(self, job: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE batch_jobs SET state = 'done', updated = ? WHERE job = ?", (time.time(), job))
            db.execute("DELETE FROM batch_items WHERE job = ?", (job,))


# --- the client -----------------------------------------------------------------------------

class LLMClient:
    def __init__(self, cfg: LLMConfig):
        self.cfg = check_llm_config(cfg)
        self._key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if cfg.api_key_env and not self._key:
            raise ValueError(f"the API key environment variable {cfg.api_key_env} is not set "
                             "(set it, or api_key_env='' for a server without keys)")
        self._slots = threading.BoundedSemaphore(cfg.max_concurrency)
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._failure_kinds: Counter = Counter()
        self._prompts: dict | None = None
        pool = cfg.max_connections or cfg.max_concurrency
        self._http = httpx.Client(
            base_url=cfg.base_url.rstrip("/") + "/",
            headers={"Authorization": f"Bearer {self._key}"} if self._key else None,
            # pool=None: waiting for a free pooled connection is not a timeout (the semaphore bounds it)
            timeout=httpx.Timeout(cfg.timeout_s, pool=None),
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool,
                                keepalive_expiry=cfg.keepalive_expiry_s))
        self._endpoint = urlsplit(cfg.base_url).path.rstrip("/") + "/chat/completions"  # /v1/chat/completions
        self.cache = AnswerCache(cfg.cache_dir) if cfg.cache_dir else None

    def __repr__(self) -> str:
        return f"LLMClient(base_url={self.cfg.base_url!r}, model={self.cfg.model!r}, mode={self.cfg.mode!r})"

    def close(self) -> None:
        self._http.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def prompts(self) -> dict:
        if self._prompts is None:
            self._prompts = load_prompts(self.cfg.prompts)
        return self._prompts

    @property
    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = dict(self._counts)
            kinds = dict(sorted(self._failure_kinds.items()))
        stats = {k: c.get(k, 0) for k in ("items", "requests", "retries", "failures", "cache_hits", "batches",
                                          "prompt_tokens", "completion_tokens")}
        stats["failures_by_kind"] = kinds
        stats["cost_usd"] = c.get("cost_usd", 0.0)
        return stats

    def _count(self, **deltas: float) -> None:
        with self._lock:
            self._counts.update(deltas)

    def _fail(self, kind: str) -> None:
        with self._lock:
            self._counts.update(failures=1)
            self._failure_kinds.update([kind])

    def _redact(self, text: str) -> str:
        return redact(text, (self._key,))

    def _clean(self, value: Any) -> Any:
        return redact_value(value, (self._key,))

    # cache

    def cache_key(self, messages: list[dict]) -> str:
        blob = json.dumps([self.cfg.base_url, self.cfg.model, messages, self.cfg.temperature],
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _from_cache(self, key: str, required: dict, validate: Callable | None) -> dict | None:
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is None:
            return None
        try:
            value = _checked(cached, required, validate, self._clean)
        except _Retryable:
            return None  # cached for another schema: ask again
        self._count(cache_hits=1)
        return value

    def _cache_put(self, key: str, value: dict) -> None:
        if self.cache is not None:  # the redacted answer, not the raw text
            self.cache.put_many(self.cfg.model, [(key, json.dumps(value, ensure_ascii=False))])

    # HTTP

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP exchange on the pooled client → a 2xx response. Raises _Retryable, LLMError, LLMFatalError."""
        try:
            with self._slots:
                response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise _Retryable("timeout", f"no answer within {self.cfg.timeout_s}s") from None
        except (httpx.TransportError, OSError) as e:
            raise _Retryable("connection", self._redact(f"{type(e).__name__}: {e}")) from None
        if response.status_code >= 400:
            code = response.status_code
            detail = self._redact(response.content[:65536].decode("utf-8", "replace"))[:200]  # redact, then cut
            if code in FATAL_STATUS:
                raise LLMFatalError(f"http_{code}", f"{self.cfg.base_url} answered {code}: {detail}")
            if code == 429 or code >= 500:
                raise _Retryable(f"http_{code}", detail, _retry_after(response.headers))
            raise LLMError(f"http_{code}", detail)
        return response

    def _body(self, messages: list[dict]) -> dict:
        body = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens}
        if self.cfg.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def _content(self, answer: Any, raw: str, price_factor: float = 1.0) -> str:
        """The assistant text of a chat completion (usage counted, redacted). Raises _Retryable."""
        try:
            usage = answer.get("usage") or {}
            prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            cost = (prompt * self.cfg.price_per_1k_prompt + completion * self.cfg.price_per_1k_completion) / 1000
            self._count(prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost * price_factor)
            content = answer["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise _Retryable("bad_response", f"not a chat completion: {self._redact(raw)[:120]!r}") from None
        if not isinstance(content, str):
            raise _Retryable("bad_response", "assistant message has no text content")
        return self._redact(content)

    def _post(self, messages: list[dict]) -> str:
        """One chat-completions request → the assistant content (usage counted). Raises _Retryable."""
        self._count(requests=1)
        raw = self._send("POST", "chat/completions", json=self._body(messages)).content
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        return self._content(answer, raw.decode("utf-8", "replace"))

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** attempt) * random.uniform(0.5, 1.0)
        return max(delay, retry_after or 0.0)

    def _wait_retry(self, attempt: int, last: _Retryable, what: str = "LLM") -> None:
        delay = self._backoff(attempt - 1, last.retry_after)
        log.warning("%s retry %d/%d after %s (%s); waiting %.2fs", what, attempt, self.cfg.max_retries,
                    last.kind, self._redact(last.message)[:120], delay)
        time.sleep(delay)

    # public API

    def complete_json(self, messages: list[dict], required: dict[str, type | tuple],
                      validate: Callable[[dict], str | None] | None = None) -> dict:
        """The JSON object answered for ``messages``, with ``required`` keys of the given types.
        ``validate`` may return a problem (text) to reject an answer and ask again. Raises LLMError.
        Always online (``mode`` applies to ``map_json``)."""
        self._count(items=1)
        key = self.cache_key(messages)
        cached = self._from_cache(key, required, validate)
        return cached if cached is not None else self._ask(key, messages, required, validate)

    def _ask(self, key: str, messages: list[dict], required: dict, validate: Callable | None) -> dict:
        """Online, with retries; the validated answer is cached."""
        last: _Retryable | None = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self._count(retries=1)
                self._wait_retry(attempt, last)
            try:
                value = _checked(self._post(messages), required, validate, self._clean)
            except _Retryable as e:
                last = e
                continue
            except LLMError as e:
                self._fail(e.kind)
                raise type(e)(e.kind, self._redact(e.message)) from None
            self._cache_put(key, value)
            return value
        self._fail(last.kind)
        raise LLMError(last.kind, self._redact(f"{last.message} (gave up after {self.cfg.max_retries} retries)"))

    def map_json(self, list_of_messages: list[list[dict]], required: dict[str, type | tuple],
                 validate: Callable[[dict], str | None] | list[Callable[[dict], str | None]] | None = None,
                 ) -> list[dict | LLMError]:
        """``complete_json`` over many requests, in input order (online: ``max_concurrency`` at a
        time; batch: Batch API jobs); a failed item is its ``LLMError``. Only ``LLMFatalError``
        (bad key/model/URL, a failed or timed-out batch) is raised. ``validate`` is one check for
        all items or a list with one per item."""
        checks = validate if isinstance(validate, list) else [validate] * len(list_of_messages)
        unique: dict[str, tuple[list[dict], Callable | None]] = {}
        keys = []
        for messages, check in zip(list_of_messages, checks, strict=True):
            key = self.cache_key(messages)
            keys.append(key)
            unique.setdefault(key, (messages, check))  # identical requests are sent once
        if self.cfg.mode == "batch":
            answers = self._map_batch(unique, required)
        else:
            answers = self._map_online(unique, required)
        return [answers[k] for k in keys]

    def _map_online(self, items: dict[str, tuple], required: dict, new_items: bool = True) -> dict:
        stop = threading.Event()  # after a fatal error the queued items send nothing

        def one(entry):
            key, (messages, check) = entry
            if stop.is_set():
                return None
            try:
                if new_items:
                    return self.complete_json(messages, required, check)
                return self._ask(key, messages, required, check)  # already counted, not cached
            except LLMFatalError:
                stop.set()
                raise
            except LLMError as e:
                return e
            except Exception as e:  # never lose the batch to one item
                self._fail("internal")
                return LLMError("internal", self._redact(f"{type(e).__name__}: {e}"))

        with ThreadPoolExecutor(max_workers=min(self.cfg.max_concurrency, max(len(items), 1))) as pool:
            return dict(zip(items, pool.map(one, items.items())))

    # batch mode

    def _map_batch(self, unique: dict[str, tuple], required: dict) -> dict:
        results: dict[str, dict | LLMError] = {}
        pending: dict[str, tuple] = {}
        for key, (messages, check) in unique.items():
            self._count(items=1)
            cached = self._from_cache(key, required, check)
            if cached is not None:
                results[key] = cached
            else:
                pending[key] = (messages, check)
        last: dict[str, _Retryable] = {}
        for round_ in range(self.cfg.batch_rounds):
            if not pending:
                break
            if round_:
                self._count(retries=len(pending))
                log.warning("LLM batch: %d lines failed (%s); sending them in batch %d/%d", len(pending),
                            ", ".join(f"{k} {n}" for k, n in Counter(e.kind for e in last.values()).items()),
                            round_ + 1, self.cfg.batch_rounds)
            for key, answer in self._batch_round(pending, required).items():
                if isinstance(answer, _Retryable):
                    last[key] = answer
                    continue
                if isinstance(answer, LLMError):
                    self._fail(answer.kind)
                results[key] = answer
                del pending[key]
                last.pop(key, None)
        if pending and self.cfg.batch_online_fallback:
            log.warning("LLM batch: %d lines still failed; asking them online", len(pending))
            self._count(retries=len(pending))
            results.update(self._map_online(pending, required, new_items=False))
        else:
            for key in pending:
                self._fail(last[key].kind)
                results[key] = LLMError(last[key].kind, self._redact(
                    f"{last[key].message} (gave up after {self.cfg.batch_rounds} batches)"))
        return results

    def _control(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A Files/Batches API call with the online retries; LLMFatalError when it gives up."""
        last: _Retryable | None = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self._wait_retry(attempt, last, f"LLM batch {method} {path}")
            try:
                return self._send(method, path, **kwargs)
            except _Retryable as e:
                last = e
            except LLMFatalError:
                raise
            except LLMError as e:
                raise LLMFatalError(e.kind, f"{method} {path}: {e.message}") from None
        raise LLMFatalError(last.kind, self._redact(f"{method} {path}: {last.message} "
                                                    f"(gave up after {self.cfg.max_retries} retries)"))

    def _control_json(self, method: str, path: str, **kwargs: Any) -> dict:
        response = self._control(method, path, **kwargs)
        try:
            value = response.json()
        except ValueError:
            value = None
        if not isinstance(value, dict) or not isinstance(value.get("id"), str):
            raise LLMFatalError("bad_response", f"{method} {path}: not a file or batch object: "
                                f"{self._redact(response.text)[:120]!r}")
        return value

    def _batch_round(self, pending: dict[str, tuple], required: dict) -> dict:
        """One batch per ``batch_max_requests`` pending requests (or the in-flight ones that hold them),
        waited for and read: key → answer | _Retryable | LLMError."""
        in_flight = self.cache.in_flight(sorted(pending))
        new = sorted(k for k in pending if k not in in_flight)
        for start in range(0, len(new), self.cfg.batch_max_requests):
            group = new[start:start + self.cfg.batch_max_requests]
            in_flight.update(dict.fromkeys(group, self.cache.new_job(group)))
        jobs: dict[str, list[str]] = {}
        for key, job in in_flight.items():
            jobs.setdefault(job, []).append(key)
        batch_ids = {job: self._submit(job, {k: pending[k][0] for k in keys}) for job, keys in jobs.items()}
        batches = self._wait_batches(list(batch_ids.values()))
        out: dict = {}
        for job, keys in jobs.items():
            batch = batches[batch_ids[job]]
            if batch["status"] == "failed":
                self.cache.finish_job(job)
                errors = (batch.get("errors") or {}).get("data") or []
                detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
                raise LLMFatalError("batch_failed", self._redact(f"batch {batch['id']} failed: {detail or '?'}")[:300])
            out.update(self._read_batch(batch, {k: pending[k][1] for k in keys}, required))
            self.cache.finish_job(job)
        return out

    def _submit(self, job: str, requests: dict[str, list[dict]]) -> str:
        """The batch id of ``job``: uploaded and created now, or the one a killed run left (re-attach)."""
        state = self.cache.job(job)
        if state.get("batch_id"):
            log.info("LLM batch: re-attaching to %s (%d of our requests)", state["batch_id"], len(requests))
            return state["batch_id"]
        file_id = state.get("input_file_id")
        if not file_id:
            lines = "".join(json.dumps({"custom_id": key, "method": "POST", "url": self._endpoint,
                                        "body": self._body(messages)}, ensure_ascii=False) + "\n"
                            for key, messages in sorted(requests.items()))
            file_id = self._control_json("POST", "files", data={"purpose": "batch"},
                                         files={"file": (f"{job}.jsonl", lines.encode("utf-8"),
                                                         "application/jsonl")})["id"]
            self.cache.update_job(job, input_file_id=file_id, state="uploaded")
        batch = self._control_json("POST", "batches", json={
            "input_file_id": file_id, "endpoint": self._endpoint,
            "completion_window": self.cfg.batch_completion_window, "metadata": {"sapretrain_job": job}})
        self.cache.update_job(job, batch_id=batch["id"], state="submitted")
        self._count(requests=len(requests), batches=1)
        log.info("LLM batch: created %s (%d requests, input %s)", batch["id"], len(requests), file_id)
        return batch["id"]

    def _wait_batches(self, batch_ids: list[str]) -> dict[str, dict]:
        deadline = time.monotonic() + self.cfg.batch_max_wait_s
        done: dict[str, dict] = {}
        status: dict[str, str] = {}
        while True:
            for batch_id in batch_ids:
                if batch_id not in done:
                    try:
                        batch = self._control_json("GET", f"batches/{batch_id}")
                    except LLMFatalError as e:
                        if e.kind != "http_404":
                            raise
                        # A re-attached batch the server no longer knows: its requests are sent again.
                        log.warning("LLM batch %s: unknown to the server; its requests will be sent again", batch_id)
                        batch = {"id": batch_id, "status": "expired", "output_file_id": None, "error_file_id": None}
                    status[batch_id] = batch.get("status")
                    if batch.get("status") in BATCH_DONE:
                        done[batch_id] = batch
                    elif batch.get("status") not in BATCH_RUNNING:
                        log.warning("LLM batch %s: unknown status %r, still waiting", batch_id, batch.get("status"))
            if len(done) == len(batch_ids):
                return done
            left = deadline - time.monotonic()
            if left <= 0:
                waiting = {b: s for b, s in status.items() if b not in done}
                raise LLMFatalError("batch_timeout", f"batches still running after {self.cfg.batch_max_wait_s}s: "
                                    f"{waiting}; they go on server-side: re-run to re-attach (ids kept in "
                                    f"{self.cache.path})")
            time.sleep(min(self.cfg.batch_poll_s, left))

    def _read_batch(self, batch: dict, checks: dict[str, Callable | None], required: dict) -> dict:
        """The answers of a finished batch for the keys of ``checks``; the valid ones are cached."""
        out: dict = {}
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if not file_id:
                continue
            try:
                text = self._control("GET", f"files/{file_id}/content").text
            except LLMFatalError as e:
                if e.kind != "http_404":
                    raise
                log.warning("LLM batch %s: file %s is gone; its requests will be sent again", batch["id"], file_id)
                continue
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                key = record.get("custom_id") if isinstance(record, dict) else None
                if key in checks and key not in out:
                    out[key] = self._batch_answer(record, required, checks[key])
        for key in checks:
            if key not in out:  # in neither file (an expired or cancelled batch leaves some out)
                out[key] = _Retryable(f"batch_{batch['status']}" if batch["status"] != "completed" else "batch_missing",
                                      f"no answer in batch {batch['id']} ({batch['status']})")
        valid = [(k, json.dumps(v, ensure_ascii=False)) for k, v in out.items() if isinstance(v, dict)]
        if valid:
            self.cache.put_many(self.cfg.model, valid)
        return out

    def _batch_answer(self, record: dict, required: dict, check: Callable | None) -> dict | _Retryable | LLMError:
        response = record.get("response") if isinstance(record.get("response"), dict) else {}
        error, code = record.get("error"), response.get("status_code")
        if error or code != 200:
            detail = self._redact(json.dumps(error or response.get("body"), ensure_ascii=False))[:200]
            if not isinstance(code, int):  # a line the batch did not run (OpenAI: code batch_expired, …)
                name = str(error.get("code") or "error") if isinstance(error, dict) else "error"
                return _Retryable(name if name.startswith("batch_") else f"batch_{name}", detail)
            if code == 429 or code >= 500:
                return _Retryable(f"http_{code}", detail)
            return LLMError(f"http_{code}", detail)
        body = response.get("body")
        try:
            content = self._content(body, json.dumps(body, ensure_ascii=False), self.cfg.batch_price_factor)
            return _checked(content, required, check, self._clean)
        except _Retryable as e:
            return e


def _checked(content: str, required: dict, validate: Callable[[dict], str | None] | None,
             clean: Callable[[Any], Any] = lambda v: v) -> dict:
    value = clean(parse_json_object(content))  # redacted before it is checked, stored or shown
    check_required(value, required)
    problem = validate(value) if validate else None
    if problem:
        raise _Retryable("invalid", problem)
    return value


def _retry_after(headers) -> float | None:
    """Seconds from ``retry-after-ms`` (OpenAI) or ``Retry-After`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        value = headers.get("Retry-After")
        if not value:
            return None
        try:
            return max(float(value), 0.0)
        except ValueError:
            return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def format_stats(stats: dict[str, Any]) -> str:
    failed = ", ".join(f"{k} {v}" for k, v in stats["failures_by_kind"].items()) or "none"
    batches = f" in {stats['batches']} batches" if stats.get("batches") else ""
    return (f"llm: {stats['items']} items, {stats['cache_hits']} from cache, {stats['requests']} requests{batches} "
            f"({stats['retries']} retries), failed {stats['failures']} ({failed}); tokens "
            f"{stats['prompt_tokens']} prompt + {stats['completion_tokens']} completion, "
            f"estimated cost ${stats['cost_usd']:.4f}")


# --- the two curation tasks -----------------------------------------------------------------

def _span_vars(sample: dict) -> dict[str, str]:
    t = sample["triplet"]
    return {"caption": sample["caption"], "subj": t["subj"]["text"], "rel": t["rel"]["text"], "obj": t["obj"]["text"]}


def _valid_label(answer: dict) -> str | None:
    return None if answer["label"] in (0, 1) else f"label must be 0 or 1, got {answer['label']!r}"


def label_triplets_detailed(client: LLMClient, samples: list[dict]) -> list[dict | LLMError]:
    """As ``label_triplets``, with the ``LLMError`` of each failed item (for drop reasons)."""
    requests = [render_prompt(client.prompts, "label_triplet", **_span_vars(s)) for s in samples]
    answers = client.map_json(requests, {"label": int, "reason": str}, _valid_label)
    return [a if isinstance(a, LLMError) else {"label": a["label"], "reason": a["reason"]} for a in answers]


def label_triplets(client: LLMClient, samples: list[dict]) -> list[dict | None]:
    """Is each sample's ``triplet`` a correct reading of its ``caption``? ``{"label": 1|0, "reason"}``
    per sample (1 = correct), None where the LLM failed (counted in ``client.stats``)."""
    return [None if isinstance(a, LLMError) else a for a in label_triplets_detailed(client, samples)]


def _negative_check(sample: dict) -> Callable[[dict], str | None]:
    v = _span_vars(sample)

    def check(answer: dict) -> str | None:
        negative = answer["negative"].strip()
        if not negative or negative.lower() == v["caption"].strip().lower():
            return "the negative must be a new, non-empty caption"
        missing = [v[k] for k in ("subj", "obj") if v[k].lower() not in negative.lower()]
        return f"the negative must keep subject and object, missing {missing}" if missing else None
    return check


def generate_negatives_detailed(client: LLMClient, samples: list[dict]) -> list[str | LLMError]:
    """As ``generate_negatives_llm``, with the ``LLMError`` of each failed item."""
    requests = [render_prompt(client.prompts, "negative", **_span_vars(s)) for s in samples]
    answers = client.map_json(requests, {"negative": str}, [_negative_check(s) for s in samples])
    return [a if isinstance(a, LLMError) else a["negative"].strip() for a in answers]


def generate_negatives_llm(client: LLMClient, samples: list[dict]) -> list[str | None]:
    """The opposite description of each sample: same subject and object, inverse relation ("the cat
    is under the table" → "the cat is on the table"). The negative caption, or None on failure."""
    return [None if isinstance(a, LLMError) else a for a in generate_negatives_detailed(client, samples)]


# --- seed labelling (tools/label_seeds.py) ---------------------------------------------------

def seed_id(record_id: str, k: int) -> str:
    """Id of triplet ``k`` of caption record ``record_id`` (kept ``[A-Za-z0-9_-]``-safe)."""
    return f"{record_id}-t{k}"


def sample_seeds(input_url: str, sample: int | None = None, seed: int = 0, source: str | None = None) -> list[dict]:
    """The (caption, triplet) items of a ``triplets.jsonl``, one per triplet, as
    ``{"id", "caption", "triplet"}`` in input order. With ``sample`` the ``sample`` items of
    smallest sha256(seed, id) are kept: deterministic, independent of the file's order and
    streaming (memory ∝ ``sample``). ``source`` keeps records of that ``source`` only."""
    import heapq

    import fsspec

    heap: list[tuple[int, int, dict]] = []  # (-rank, order, item): a max-heap of the kept ranks
    order = 0
    with fsspec.open(input_url, "rt", encoding="utf-8", errors="replace", compression="infer") as f:
        for n, line in enumerate(f):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
                continue
            if source is not None and record.get("source") != source:
                continue
            record_id = str(record.get("id", f"line{n}"))
            for k, triplet in enumerate(record.get("triplets") or []):
                item = {"id": seed_id(record_id, k), "caption": record["caption"], "triplet": triplet}
                order += 1
                if sample is None:
                    heap.append((0, order, item))
                    continue
                rank = int.from_bytes(hashlib.sha256(f"{seed}:{item['id']}".encode()).digest()[:8], "big")
                if len(heap) < sample:
                    heapq.heappush(heap, (-rank, order, item))
                elif -heap[0][0] > rank:
                    heapq.heapreplace(heap, (-rank, order, item))
    return [item for _, _, item in sorted(heap, key=lambda entry: entry[1])]


class LabelStage:
    """``run_stage`` stage: seed items → the same with ``label``, ``reason``, ``labeler``;
    items the LLM failed on are dropped as ``llm_<kind>`` with the error as ``drop_detail``."""

    name = "label_seeds"

    def __init__(self, cfg: LLMConfig, extra_fingerprint: dict | None = None):
        self.cfg, self.extra = cfg, extra_fingerprint or {}
        self.client = LLMClient(cfg)

    def setup(self) -> None:
        pass

    def fingerprint(self) -> dict:
        prompt = json.dumps(self.client.prompts["label_triplet"], sort_keys=True)
        return {"base_url": self.cfg.base_url, "model": self.cfg.model, "temperature": self.cfg.temperature,
                "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest()[:16], **self.extra}

    def process(self, records: list[dict]) -> list[dict]:
        good = [r for r in records if _is_seed(r)]
        answers = iter(label_triplets_detailed(self.client, good))
        out = []
        for r in records:
            if not _is_seed(r):
                out.append({**r, "drop_reason": "bad_record", "drop_detail": "needs id, caption and a triplet"})
                continue
            a = next(answers)
            base = {"id": r["id"], "caption": r["caption"], "triplet": r["triplet"]}
            if isinstance(a, LLMError):
                out.append({**base, "drop_reason": f"llm_{a.kind}", "drop_detail": a.message[:300]})
            else:
                out.append({**base, **a, "labeler": f"llm:{self.cfg.model}"})
        return out


def _is_seed(r: dict) -> bool:
    t = r.get("triplet")
    return (isinstance(r.get("caption"), str) and "id" in r and isinstance(t, dict)
            and all(isinstance(t.get(k), dict) and isinstance(t[k].get("text"), str) for k in ("subj", "rel", "obj")))


def seeds_output(output: str) -> str:
    """Where ``label_seeds`` keeps its sampled items: ``labels.jsonl`` → ``labels.seeds.jsonl``."""
    head, dot, ext = output.rpartition(".")
    return f"{head}.seeds.{ext}" if dot and "/" not in ext else f"{output}.seeds"


def label_seeds(input_url: str, output: str, cfg: LLMConfig, sample: int | None = None, seed: int = 0,
                source: str | None = None, parts=None, chunk_size: int = 500,
                progress: bool = True) -> tuple[dict, dict]:
    """Sample seed items of ``input_url`` (written to ``seeds_output(output)``) and label them with the
    LLM through ``run_stage`` (chunks, resume, parts). Returns (stage summary, client stats)."""
    from sapretrain import storage
    from sapretrain.curation.stage import StageConfig, run_stage
    from sapretrain.jobs import Parts

    if sample is not None and sample < 1:
        raise ValueError(f"--sample must be >= 1, got {sample}")
    stage = LabelStage(cfg, {"input": input_url, "sample": sample, "seed": seed, "source": source})
    items = sample_seeds(input_url, sample, seed, source)
    seeds = seeds_output(output)
    # Every part and every re-run writes the same bytes (the sample is deterministic).
    storage.write_bytes_atomic(seeds, "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items).encode())
    try:
        summary = run_stage(stage, seeds, output, StageConfig(chunk_size=chunk_size), parts or Parts(), progress)
    finally:
        stage.client.close()
    return summary, stage.client.stats
