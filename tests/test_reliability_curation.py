"""Hostile inputs against curation (issue 13): weights files that run code, an LLM server quoting
the key back, outputs that belong to another input, empty inputs, every row dropped, and config
files that are not YAML. Each hostile input is written by the test."""
from __future__ import annotations

import json
import logging
import os
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sapretrain.config import ConfigError, load_config
from sapretrain.curation.stage import (NothingKeptError, StageConfig, dropped_output, format_stage_summary,
                                       run_stage)

# ---------------------------------------------------------------------------------------------
# Detector weights: a pickle that runs code when loaded


class WritesFile:
    """Unpickling this calls ``exec``, which writes ``marker``: what a planted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class DunderGetattr:
    """Only allow-listed globals (``getattr``, ``Conv2d``), but reaching for a dunder attribute:
    the scan passes it, the restricted unpickler must not."""

    def __reduce__(self):
        import torch

        return (getattr, (torch.nn.Conv2d, "__init__"))


@pytest.fixture
def weights_env(tmp_path, monkeypatch):
    """An empty weights folder and a working directory holding a planted ``yolov8n.pt``."""
    import torch

    marker = tmp_path / "PWNED"
    weights = tmp_path / "weights"
    weights.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    torch.save({"model": WritesFile(marker)}, cwd / "yolov8n.pt")
    (cwd / "raw.pt").write_bytes(pickle.dumps(WritesFile(marker)))
    torch.save({"model": DunderGetattr()}, cwd / "sneaky.pt")
    monkeypatch.setenv("SAPRETRAIN_WEIGHTS_DIR", str(weights))
    monkeypatch.chdir(cwd)
    return {"marker": marker, "weights": weights, "cwd": cwd}


def test_planted_weights_never_run(weights_env):
    from sapretrain.curation.rois import RoiStage, load_roi_config
    from sapretrain.detector import DetectorError, UnsafeWeightsError, load_yolo
    from sapretrain.eval.vsr import YoloBoxes

    marker = weights_env["marker"]
    # The default name resolves to the weights folder, not to the planted ./yolov8n.pt.
    for load in (lambda: load_yolo("yolov8n.pt"), lambda: YoloBoxes(),
                 lambda: RoiStage(load_roi_config(None)).detector):
        with pytest.raises(DetectorError, match="never in the working directory") as info:
            load()
        assert not isinstance(info.value, UnsafeWeightsError)  # the planted file was not even opened
    # Named explicitly, each hostile file is refused with the reason.
    with pytest.raises(UnsafeWeightsError, match="builtins.exec"):
        load_yolo("./yolov8n.pt")
    with pytest.raises(UnsafeWeightsError, match="not a torch.save checkpoint"):
        load_yolo("./raw.pt")
    with pytest.raises(DetectorError, match="cannot load detector"):
        load_yolo("./sneaky.pt")  # passes the scan, stopped by the restricted unpickler
    with pytest.raises(DetectorError, match="ONNX"):
        load_yolo("./model.onnx")
    assert not marker.exists()


def test_detect_rois_with_planted_weights_exits_2(weights_env, capsys):
    from tools.detect_rois import main

    cwd = weights_env["cwd"]
    record = {"id": "s", "image": str(cwd / "x.jpg"), "caption": "a man riding a horse",
              "triplet": {p: {"text": t, "start": 0, "end": 1} for p, t in
                          (("subj", "man"), ("rel", "riding"), ("obj", "horse"))}}
    from PIL import Image

    Image.new("RGB", (64, 48)).save(cwd / "x.jpg")
    (cwd / "in.jsonl").write_text(json.dumps(record) + "\n")
    for i, weights in enumerate(([], ["--weights", "./yolov8n.pt"])):
        with pytest.raises(SystemExit) as info:
            main(["--input", "in.jsonl", "--output", f"out{i}.jsonl", "--no-progress", *weights])
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "never in the working directory" in err and "builtins.exec" in err and "Traceback" not in err
    assert not weights_env["marker"].exists()


def test_genuine_checkpoint_loads_from_the_weights_folder(weights_env):
    from PIL import Image

    from sapretrain.curation.rois import YoloDetector
    from sapretrain.detector import check_checkpoint, load_yolo

    built = load_yolo("yolov8n.yaml")  # random init from ultralytics' packaged config
    built.save(str(weights_env["weights"] / "yolov8n.pt"))
    check_checkpoint(weights_env["weights"] / "yolov8n.pt")
    detector = YoloDetector("yolov8n.pt", imgsz=64, batch=1)  # the default name, now present
    assert Path(detector.model.ckpt_path).parent == weights_env["weights"]
    found = detector([Image.new("RGB", (64, 48), (120, 90, 60))])
    assert len(found) == 1 and isinstance(found[0], list)
    assert not weights_env["marker"].exists()


# ---------------------------------------------------------------------------------------------
# LLM: a server that quotes the request's Authorization header back

KEY = "sk-live-7Qw3Ez9Rt5Yu1Io8Pa"


def quoting_handler(requests: list):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send(self, code: int, payload: bytes):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            auth = self.headers.get("Authorization", "")
            requests.append(auth)
            user = body["messages"][-1]["content"]
            secret = auth.split(" ", 1)[-1]
            escaped = "".join(f"\\u{ord(c):04x}" for c in secret)  # JSON-escaped: not the key byte for byte
            # Padding puts the unredacted key across the cut of the 120/200-character messages.
            if 'subject "dog0"' in user:  # not JSON at all, quoting the header
                content = f"I cannot help. {'x' * 57} Your request had Authorization: {auth}"
            elif 'subject "dog1"' in user:  # JSON quoting the header in a value that gets stored
                content = json.dumps({"label": 1, "reason": f"you sent {auth}"})
            elif 'subject "dog2"' in user:  # the key JSON-escaped inside the answer
                content = '{"label": 1, "reason": "key ' + escaped + '"}'
            elif 'subject "cat1"' in user:  # an error body quoting the header after 190 characters
                self.send(400, json.dumps({"error": f"{'y' * 165} bad header {auth}"}).encode())
                return
            elif 'subject "cat2"' in user:  # not a chat completion: a proxy page quoting the header
                self.send(200, f"<html>{'x' * 75} proxy saw Authorization: {auth}</html>".encode())
                return
            else:
                content = json.dumps({"label": 1, "reason": "fine"})
            self.send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}],
                                       "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode())

    return Handler


def _triplet(caption, subj, rel, obj):
    def span(text):
        start = caption.index(text)
        return {"text": text, "start": start, "end": start + len(text)}
    return {"subj": span(subj), "rel": {**span(rel), "kind": "spatial"}, "obj": span(obj)}


def test_llm_key_never_recorded(tmp_path, monkeypatch, caplog, capsys):
    from tools.label_seeds import main

    requests: list = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), quoting_handler(requests))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("SAPRETRAIN_REDACT_KEY", KEY)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    try:
        rows = []
        for i in range(3):
            c = f"cat{i} under table{i} and dog{i} near car{i}"
            rows.append({"id": f"r{i}", "caption": c, "triplets": [_triplet(c, f"cat{i}", "under", f"table{i}"),
                                                                   _triplet(c, f"dog{i}", "near", f"car{i}")]})
        (tmp_path / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / "llm.yaml").write_text(
            f"base_url: http://127.0.0.1:{httpd.server_address[1]}/v1\nmodel: m\napi_key_env: SAPRETRAIN_REDACT_KEY\n"
            f"max_retries: 1\nbackoff_base_s: 0.001\nbackoff_max_s: 0.01\ncache_dir: {tmp_path / 'cache'}\n")
        out = tmp_path / "labels.jsonl"
        with caplog.at_level(logging.DEBUG):
            code = main(["--input", str(tmp_path / "triplets.jsonl"), "--output", str(out),
                         "--config", str(tmp_path / "llm.yaml"), "--no-progress"])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert code == 0 and set(requests) == {f"Bearer {KEY}"}  # the key was really sent, and quoted back
    printed = capsys.readouterr()
    labels = [json.loads(line) for line in open(out)]
    dropped = [json.loads(line) for line in open(dropped_output(str(out)))]
    assert sorted(r["id"] for r in labels) == ["r0-t0", "r1-t1", "r2-t1"]
    by_id = {r["id"]: r for r in labels}
    assert "***" in by_id["r1-t1"]["reason"] and "***" in by_id["r2-t1"]["reason"]  # stored, redacted
    assert {d["id"]: d["drop_reason"] for d in dropped} == {"r0-t1": "llm_bad_json", "r1-t0": "llm_http_400",
                                                            "r2-t0": "llm_bad_response"}
    texts = {"log": caplog.text, "stdout": printed.out, "stderr": printed.err}
    for path in [out, Path(dropped_output(str(out))), Path(f"{out}.summary.json"), *tmp_path.glob("cache/*")]:
        texts[str(path)] = path.read_bytes().decode("utf-8", "replace")  # the SQLite cache (and its WAL) too
    assert any("cache" in name for name in texts)
    for name, text in texts.items():
        assert KEY not in text and KEY[:12] not in text, name  # neither whole nor cut in half
    drops = texts[dropped_output(str(out))]
    assert drops.count("Authorization: Bearer ***") == 2 and "header Bearer ***" in drops


# ---------------------------------------------------------------------------------------------
# Stage outputs: whose are they, and did anything happen


class KeepEven:
    name = "keep_even"

    def __init__(self):
        self.setups = 0

    def setup(self):
        self.setups += 1

    def fingerprint(self):
        return {}

    def process(self, records):
        return [r if r["n"] % 2 == 0 else {**r, "drop_reason": "odd"} for r in records]


def write_numbers(path: Path, numbers) -> str:
    path.write_text("".join(json.dumps({"n": n}) + "\n" for n in numbers))
    return str(path)


def test_stage_output_must_belong_to_its_input(tmp_path):
    src = write_numbers(tmp_path / "in.jsonl", range(6))
    out = tmp_path / "out.jsonl"
    out.write_text("")  # an empty file where the output goes: not "finished"
    with pytest.raises(ValueError, match="not taken as done"):
        run_stage(KeepEven(), src, str(out), StageConfig(chunk_size=4), progress=False)
    out.unlink()
    first = run_stage(KeepEven(), src, str(out), StageConfig(chunk_size=4), progress=False)
    assert first["kept"] == 3 and "already_done" not in first

    again = KeepEven()
    done = run_stage(again, src, str(out), StageConfig(chunk_size=4), progress=False)
    assert done["already_done"] and again.setups == 0
    line = format_stage_summary(done)
    assert "already done" in line and "\n" not in line

    write_numbers(tmp_path / "in.jsonl", range(8))  # the input changed under the finished output
    with pytest.raises(ValueError, match="another input"):
        run_stage(KeepEven(), src, str(out), StageConfig(chunk_size=4), progress=False)

    # A resume whose input changed under its committed chunks is refused too.
    class Crash(KeepEven):
        def process(self, records):
            raise RuntimeError("killed")
    other = str(tmp_path / "other.jsonl")
    write_numbers(tmp_path / "big.jsonl", range(9))
    with pytest.raises(RuntimeError):
        run_stage(Crash(), str(tmp_path / "big.jsonl"), other, StageConfig(chunk_size=4), progress=False)
    write_numbers(tmp_path / "big.jsonl", range(1, 10))
    with pytest.raises(ValueError, match="other settings"):
        run_stage(KeepEven(), str(tmp_path / "big.jsonl"), other, StageConfig(chunk_size=4), progress=False)


def test_stage_that_does_nothing_fails(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no records"):
        run_stage(KeepEven(), str(empty), str(tmp_path / "a.jsonl"), progress=False)
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "a.jsonl.chunks").exists()
    with pytest.raises(ValueError, match="does not exist"):
        run_stage(KeepEven(), str(tmp_path / "missing.jsonl"), str(tmp_path / "a.jsonl"), progress=False)

    odd = write_numbers(tmp_path / "odd.jsonl", [1, 3, 5])
    out = tmp_path / "b.jsonl"
    for _ in range(2):  # the first run and the re-run of the finished output both say so
        with pytest.raises(NothingKeptError, match="all 3 records .* were dropped \\(odd 3\\)"):
            run_stage(KeepEven(), odd, str(out), progress=False)
    assert out.read_text() == "" and len(Path(dropped_output(str(out))).read_text().splitlines()) == 3


def test_stage_tools_exit_nonzero_with_the_reason(tmp_path, capsys):
    from tools.make_samples import main

    src = tmp_path / "triplets.jsonl"
    src.write_text(json.dumps({"id": "a", "image": "a.jpg", "caption": "a sunny day", "triplets": []}) + "\n")
    out = tmp_path / "samples.jsonl"
    with pytest.raises(SystemExit) as info:  # the only caption has no triplet: nothing kept
        main(["--input", str(src), "--output", str(out), "--no-progress"])
    assert info.value.code == 2 and "were dropped (no_triplet 1)" in capsys.readouterr().err
    src.write_text(json.dumps({"id": "a", "image": "a.jpg", "caption": "a man on a horse", "triplets": [
        _triplet("a man on a horse", "man", "on", "horse")]}) + "\n")
    out = tmp_path / "kept.jsonl"
    assert main(["--input", str(src), "--output", str(out), "--no-progress"]) == 0
    out.write_text("")  # replaced after the run: its summary no longer describes it
    with pytest.raises(SystemExit) as info:
        main(["--input", str(src), "--output", str(out), "--no-progress"])
    assert info.value.code == 2 and "not the file its run wrote" in capsys.readouterr().err
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text("")  # never written by a run at all
    with pytest.raises(SystemExit) as info:
        main(["--input", str(src), "--output", str(fresh), "--no-progress"])
    assert info.value.code == 2 and "not taken as done" in capsys.readouterr().err


def test_extract_svo_checks_what_it_finds(tmp_path, capsys):
    from tools.extract_svo import main

    src = tmp_path / "captions.jsonl"
    src.write_text("".join(json.dumps({"id": i, "caption": c}) + "\n"
                           for i, c in enumerate(["a cat under a table", "a dog next to a car"])))
    out = tmp_path / "triplets.jsonl"
    out.write_text("")  # the silent no-op of the issue: an empty output reported as "captions read 0"
    args = ["--input", str(src), "--output", str(out), "--no-progress"]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and "not taken as done" in capsys.readouterr().err
    out.unlink()
    assert main(args) == 0 and "captions read      2" in capsys.readouterr().out
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.startswith("already done:") and "wrote" not in again

    src.write_text(json.dumps({"id": 0, "caption": "a bird on a branch"}) + "\n")
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and "another input" in capsys.readouterr().err

    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"text": "no caption field"}\n{"caption": ""}\n')
    with pytest.raises(SystemExit) as info:
        main(["--input", str(junk), "--output", str(tmp_path / "j.jsonl"), "--no-progress"])
    assert info.value.code == 2 and "all 2 captions" in capsys.readouterr().err
    (tmp_path / "none.jsonl").write_text("")
    with pytest.raises(SystemExit) as info:
        main(["--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "n.jsonl"), "--no-progress"])
    assert info.value.code == 2 and "no records" in capsys.readouterr().err


def test_collect_captions_checks_what_it_finds(tmp_path, capsys):
    from tools.collect_captions import main

    csv = tmp_path / "pairs.csv"
    csv.write_text("caption,path\na dog on a sofa,imgs/1.jpg\na cat near a window,imgs/2.jpg\n")
    out = tmp_path / "captions.jsonl"
    args = ["--source", "csv", "--input", str(csv), "--output", str(out), "--no-progress"]
    out.write_text("")  # planted: not a finished collect run
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and "not taken as done" in capsys.readouterr().err
    out.unlink()
    assert main(args) == 0 and "records written: 2" in capsys.readouterr().out
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.startswith("already done:") and len(again.strip().splitlines()) == 1
    csv.write_text("caption,path\na dog on a sofa,imgs/1.jpg\n")  # the input changed since
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and "another input" in capsys.readouterr().err

    bad = tmp_path / "bad.csv"
    bad.write_text("caption,path\n,imgs/1.jpg\na caption without image,\n")
    with pytest.raises(SystemExit) as info:  # every row skipped
        main(["--source", "csv", "--input", str(bad), "--output", str(tmp_path / "b.jsonl"), "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no records written" in err and "empty_caption 1" in err
    # Nothing left behind that would refuse the corrected rerun as "made with other settings".
    assert not (tmp_path / "b.jsonl").exists() and not (tmp_path / "b.jsonl.done.json").exists()


# ---------------------------------------------------------------------------------------------
# Config files that are not configs


def hostile_configs(tmp_path: Path, marker: Path) -> dict[str, Path]:
    files = {
        "syntax": "detector:\n  conf: [0.3\n",
        "python_tag": f"!!python/object/apply:os.system ['touch {marker}']\n",
        "python_object": "detector: !!python/object:sapretrain.curation.rois.DetectorConfig {}\n",
        "deep": "a: " + "[" * 600 + "]" * 600 + "\n",  # past the recursion limit of the YAML composer
    }
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(text)
    paths["binary"] = tmp_path / "binary.yaml"
    paths["binary"].write_bytes(bytes(range(256)) * 4)
    paths["missing"] = tmp_path / "missing.yaml"
    return paths


def test_bad_config_files_are_one_line_errors(tmp_path, capsys):
    from sapretrain.curation.rois import RoiConfig
    from tools.curate import main as curate
    from tools.detect_rois import main as detect_rois

    marker = tmp_path / "PWNED"
    (tmp_path / "in.jsonl").write_text('{"id": "a"}\n')
    for name, path in hostile_configs(tmp_path, marker).items():
        with pytest.raises(ConfigError, match=path.name):
            load_config(RoiConfig, path)
        with pytest.raises(SystemExit) as info:
            detect_rois(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"),
                         "--config", str(path), "--no-progress"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and path.name in err and "Traceback" not in err, name
        assert curate(["--config", str(path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert path.name in err and len(err.strip().splitlines()) == 1, (name, err)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RoiConfig, None, ["detector.conf=[0.3"])
    from sapretrain.curation.llm import load_prompts

    with pytest.raises(ConfigError, match="python_tag.yaml"):
        load_prompts(tmp_path / "python_tag.yaml")
    assert not marker.exists()
    assert os.path.exists(tmp_path / "in.jsonl")
