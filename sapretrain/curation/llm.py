"""An OpenAI-compatible chat-completions client for curation, and the two LLM tasks (paper §2.1, App. A).

    cfg = load_llm_config("configs/curation/llm.yaml", ["model=gpt-4o-mini"])
    client = LLMClient(cfg)
    labels = label_triplets(client, samples)             # [{"label": 0|1, "reason": str} | None]
    negatives = generate_negatives_llm(client, samples)  # [str | None]
    print(format_stats(client.stats))

**Requests.** ``POST {base_url}/chat/completions`` with the standard library only (no HTTP
dependency), at most ``max_concurrency`` requests in flight per client (a semaphore, so it also
holds across concurrent ``map_json`` calls). The API key is read from the environment variable
*named* by ``api_key_env`` and sent as ``Authorization: Bearer``; it is never stored in the config,
the cache, the stats, a log line or an exception.

**Redaction** (``redact``): a server (or a proxy) may quote the request back, in an error body, a
non-JSON answer or inside the JSON answer itself. Everything the client records passes one
function first: the raw response text before it is cut for a message, the assistant content
before it is parsed, every string of the parsed answer (after JSON unescaping, so an answer
spelling the key as ``\u0073k-…`` is caught too) and every error message. It replaces the key's
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
``bad_response``, ``bad_json``, ``missing_key``, ``bad_type``, ``invalid``, ``http_400``) and the
other items of the batch are unaffected. 401/403/404 mean the key, model or URL is wrong for every
item, so they raise ``LLMFatalError`` out of the batch instead of failing a million items one by one.

**Cache.** With ``cache_dir`` set, each *validated* answer is stored as
``cache_dir/ab/abcdef….json`` keyed by sha256 of (base_url, model, messages, temperature), written
atomically; a re-run answers from it without HTTP requests. Identical requests inside one batch
are sent once.

**Accounting.** ``client.stats``: ``items``, ``requests`` (HTTP attempts), ``retries``,
``failures``, ``failures_by_kind``, ``cache_hits``, ``prompt_tokens``, ``completion_tokens``
(from each response's ``usage``, also for answers that failed validation: they were paid for) and
``cost_usd`` = tokens / 1000 × ``price_per_1k_prompt`` / ``price_per_1k_completion``.

**Prompts** live in ``configs/curation/prompts.yaml`` (``render_prompt``), not in this module.
"""
from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import logging
import os
import random
import re
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sapretrain.config import load_config, read_yaml

log = logging.getLogger(__name__)

FATAL_STATUS = (401, 403, 404)  # wrong key, model or URL: the same for every item


@dataclass
class LLMConfig:
    base_url: str = "https://api.openai.com/v1"  # OpenAI-compatible root (vLLM: http://host:8000/v1)
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the env var holding the key; "" = send no key
    max_concurrency: int = 8  # requests in flight per client
    max_retries: int = 4  # retries after the first attempt (HTTP errors and malformed answers alike)
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 60.0  # per request (connect and each read)
    temperature: float = 0.0
    max_tokens: int = 256
    json_mode: bool = True  # send response_format={"type": "json_object"}
    cache_dir: str | None = ".cache/llm"  # local folder; null = no cache
    prompts: str = "configs/curation/prompts.yaml"  # a path, or a configs/ name shipped with the package
    price_per_1k_prompt: float = 0.0  # USD per 1,000 prompt tokens (cost estimate only)
    price_per_1k_completion: float = 0.0


def load_llm_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LLMConfig:
    cfg = load_config(LLMConfig, path, overrides)
    if cfg.max_concurrency < 1 or cfg.max_retries < 0 or cfg.timeout_s <= 0:
        raise ValueError("llm config: need max_concurrency >= 1, max_retries >= 0, timeout_s > 0")
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


# --- the client -----------------------------------------------------------------------------

class LLMClient:
    def __init__(self, cfg: LLMConfig):
        self.cfg = cfg
        self._key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        if cfg.api_key_env and not self._key:
            raise ValueError(f"the API key environment variable {cfg.api_key_env} is not set "
                             "(set it, or api_key_env='' for a server without keys)")
        self._slots = threading.BoundedSemaphore(cfg.max_concurrency)
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._failure_kinds: Counter = Counter()
        self._prompts: dict | None = None

    def __repr__(self) -> str:
        return f"LLMClient(base_url={self.cfg.base_url!r}, model={self.cfg.model!r})"

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
        stats = {k: c.get(k, 0) for k in ("items", "requests", "retries", "failures", "cache_hits",
                                          "prompt_tokens", "completion_tokens")}
        stats["failures_by_kind"] = kinds
        stats["cost_usd"] = (stats["prompt_tokens"] * self.cfg.price_per_1k_prompt
                             + stats["completion_tokens"] * self.cfg.price_per_1k_completion) / 1000
        return stats

    def _count(self, **deltas: int) -> None:
        with self._lock:
            self._counts.update(deltas)

    def _redact(self, text: str) -> str:
        return redact(text, (self._key,))

    def _clean(self, value: Any) -> Any:
        return redact_value(value, (self._key,))

    # cache

    def cache_key(self, messages: list[dict]) -> str:
        blob = json.dumps([self.cfg.base_url, self.cfg.model, messages, self.cfg.temperature],
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return Path(self.cfg.cache_dir) / key[:2] / f"{key}.json" if self.cfg.cache_dir else None

    def _cache_get(self, key: str) -> str | None:
        path = self._cache_path(key)
        if path is None or not path.exists():
            return None
        try:
            return json.loads(path.read_text())["content"]
        except (ValueError, KeyError, OSError):
            return None  # a damaged entry is a miss; the answer is fetched and written again

    def _cache_put(self, key: str, content: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # Threads of one process may write the same key: each uses its own temporary file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"model": self.cfg.model, "content": content}, f, ensure_ascii=False)
        os.replace(tmp, path)

    # HTTP

    def _post(self, messages: list[dict]) -> str:
        """One chat-completions request → the assistant content (usage counted). Raises _Retryable."""
        body = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens}
        if self.cfg.json_mode:
            body["response_format"] = {"type": "json_object"}
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(f"{self.cfg.base_url.rstrip('/')}/chat/completions",
                                         data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
        self._count(requests=1)
        try:
            with self._slots, urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = self._redact(e.read(65536).decode("utf-8", "replace"))[:200]  # redact, then cut
            if e.code in FATAL_STATUS:
                raise LLMFatalError(f"http_{e.code}", f"{self.cfg.base_url} answered {e.code}: {detail}") from None
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"http_{e.code}", detail, _retry_after(e.headers)) from None
            raise LLMError(f"http_{e.code}", detail) from None
        except (TimeoutError, socket.timeout):
            raise _Retryable("timeout", f"no answer within {self.cfg.timeout_s}s") from None
        except urllib.error.URLError as e:
            kind = "timeout" if isinstance(e.reason, (TimeoutError, socket.timeout)) else "connection"
            raise _Retryable(kind, self._redact(str(e.reason))) from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Retryable("connection", self._redact(f"{type(e).__name__}: {e}")) from None
        try:
            answer = json.loads(raw)
            usage = answer.get("usage") or {}
            self._count(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                        completion_tokens=int(usage.get("completion_tokens") or 0))
            content = answer["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            text = self._redact(raw.decode("utf-8", "replace"))
            raise _Retryable("bad_response", f"not a chat completion: {text[:120]!r}") from None
        if not isinstance(content, str):
            raise _Retryable("bad_response", "assistant message has no text content")
        return self._redact(content)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** attempt) * random.uniform(0.5, 1.0)
        return max(delay, retry_after or 0.0)

    # public API

    def complete_json(self, messages: list[dict], required: dict[str, type | tuple],
                      validate: Callable[[dict], str | None] | None = None) -> dict:
        """The JSON object answered for ``messages``, with ``required`` keys of the given types.
        ``validate`` may return a problem (text) to reject an answer and ask again. Raises LLMError."""
        self._count(items=1)
        key = self.cache_key(messages)
        cached = self._cache_get(key)
        if cached is not None:
            try:
                value = _checked(cached, required, validate, self._clean)
                self._count(cache_hits=1)
                return value
            except _Retryable:
                pass  # cached for another schema: ask again
        last: _Retryable | None = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self._count(retries=1)
                delay = self._backoff(attempt - 1, last.retry_after)
                log.warning("LLM retry %d/%d after %s (%s); waiting %.2fs", attempt, self.cfg.max_retries,
                            last.kind, self._redact(last.message)[:120], delay)
                time.sleep(delay)
            try:
                content = self._post(messages)
                value = _checked(content, required, validate, self._clean)
            except _Retryable as e:
                last = e
                continue
            except LLMError as e:
                self._fail(e.kind)
                raise type(e)(e.kind, self._redact(e.message)) from None
            self._cache_put(key, json.dumps(value, ensure_ascii=False))  # the redacted answer, not the raw text
            return value
        self._fail(last.kind)
        raise LLMError(last.kind, self._redact(f"{last.message} (gave up after {self.cfg.max_retries} retries)"))

    def _fail(self, kind: str) -> None:
        with self._lock:
            self._counts.update(failures=1)
            self._failure_kinds.update([kind])

    def map_json(self, list_of_messages: list[list[dict]], required: dict[str, type | tuple],
                 validate: Callable[[dict], str | None] | list[Callable[[dict], str | None]] | None = None,
                 ) -> list[dict | LLMError]:
        """``complete_json`` over many requests, ``max_concurrency`` at a time, in input order; a
        failed item is its ``LLMError``. Only ``LLMFatalError`` (bad key/model/URL) is raised.
        ``validate`` is one check for all items or a list with one per item."""
        checks = validate if isinstance(validate, list) else [validate] * len(list_of_messages)
        unique: dict[str, tuple[list[dict], Callable | None]] = {}
        keys = []
        for messages, check in zip(list_of_messages, checks, strict=True):
            key = self.cache_key(messages)
            keys.append(key)
            unique.setdefault(key, (messages, check))  # identical requests are sent once

        stop = threading.Event()  # after a fatal error the queued items send nothing

        def one(item):
            if stop.is_set():
                return None
            try:
                return self.complete_json(item[0], required, item[1])
            except LLMFatalError:
                stop.set()
                raise
            except LLMError as e:
                return e
            except Exception as e:  # never lose the batch to one item
                self._fail("internal")
                return LLMError("internal", self._redact(f"{type(e).__name__}: {e}"))

        with ThreadPoolExecutor(max_workers=min(self.cfg.max_concurrency, max(len(unique), 1))) as pool:
            answers = dict(zip(unique, pool.map(one, unique.values())))
        return [answers[k] for k in keys]


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
    return (f"llm: {stats['items']} items, {stats['cache_hits']} from cache, {stats['requests']} requests "
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
                source: str | None = None, part: int = 0, num_parts: int = 1, chunk_size: int = 500,
                progress: bool = True) -> tuple[dict, dict]:
    """Sample seed items of ``input_url`` (written to ``seeds_output(output)``) and label them with the
    LLM through ``run_stage`` (chunks, resume, parts). Returns (stage summary, client stats)."""
    from sapretrain import storage
    from sapretrain.curation.stage import StageConfig, run_stage

    if sample is not None and sample < 1:
        raise ValueError(f"--sample must be >= 1, got {sample}")
    stage = LabelStage(cfg, {"input": input_url, "sample": sample, "seed": seed, "source": source})
    items = sample_seeds(input_url, sample, seed, source)
    seeds = seeds_output(output)
    # Every part and every re-run writes the same bytes (the sample is deterministic).
    storage.write_bytes_atomic(seeds, "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items).encode())
    summary = run_stage(stage, seeds, output, StageConfig(chunk_size=chunk_size), part, num_parts, progress)
    return summary, stage.client.stats
