"""Engines on the tiny model: HF batching, padding, stops, folding, JSON, LoRA; OpenAI retries.

Fast (CPU, well under a minute). vLLM has its own module, `test_engine_vllm.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cpt.config import EngineConfig, EngineKind, ModelConfig
from cpt.engines import Request, Sampling, adapter_name, build_engine, request_seed
from cpt.engines.schema import schema_problems
from cpt.models.tiny import tiny_model_dir
from cpt.prompts import JUDGE_SCHEMA  # the judge's own schema, not a copy

CRITIQUE_MAX = JUDGE_SCHEMA["properties"]["critique"]["maxLength"]
GREEDY = Sampling(max_new_tokens=12, temperature=0.0)


def chat(user: str, system: str | None = None) -> tuple[dict[str, str], ...]:
    msgs = [{"role": "system", "content": system}] if system else []
    return (*msgs, {"role": "user", "content": user})


def make_lora_adapter(out_dir: Path, variant: str = "tiny", seed: int = 0) -> str:
    """A PEFT LoRA adapter (r=8 on q_proj, v_proj) for the tiny model, with random A *and* B
    (`init_lora_weights=False`) so that it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(variant))
    torch.manual_seed(seed)
    model = get_peft_model(
        base,
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    model.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from intra-op threads, and on a shared 2-core box
    OpenMP spin-waits under oversubscription made single tests 20x slower (2 s -> 40 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_cfg() -> ModelConfig:
    return ModelConfig(name="tiny", path="builtin:tiny", max_model_len=512)


@pytest.fixture(scope="module")
def hf(tiny_cfg):
    engine = build_engine(tiny_cfg, EngineConfig(kind=EngineKind.hf, batch_size=4))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> str:
    return make_lora_adapter(tmp_path_factory.mktemp("lora") / "adapter")


# -- package -------------------------------------------------------------------------------


def test_import_is_light():
    code = (
        "import sys, cpt.engines; heavy = {'torch', 'vllm', 'transformers', 'openai'} "
        "& set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_engine_per_model_override(tiny_cfg):
    from cpt.engines.openai import OpenAIEngine

    cfg = ModelConfig(name="srv", path="m", engine=EngineKind.openai, base_url="http://x/v1")
    engine = build_engine(cfg, EngineConfig(kind=EngineKind.hf))  # model.engine wins
    assert isinstance(engine, OpenAIEngine)
    engine.close()


def test_request_seed_and_adapter_name(tmp_path):
    assert request_seed(Request("a", chat("x"), Sampling(seed=7))) == 7
    unseeded = Request("row-1", chat("x"), Sampling(seed=None))
    assert request_seed(unseeded) == request_seed(Request("row-1", chat("y")))  # id only
    assert request_seed(unseeded) != request_seed(Request("row-2", chat("x")))
    (tmp_path / "my.adapter").mkdir()
    name = adapter_name(str(tmp_path / "my.adapter"))
    assert name.startswith("my_adapter-") and name == adapter_name(str(tmp_path / "my.adapter"))
    assert adapter_name("served-name") == "served-name"


# -- HF ------------------------------------------------------------------------------------


def test_trust_remote_code_off_by_default(monkeypatch, tiny_cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen: dict[str, dict] = {}
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            seen[_name] = kwargs
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    assert ModelConfig(name="m", path="p").trust_remote_code is False
    build_engine(tiny_cfg, EngineConfig()).close()
    assert {name: kw["trust_remote_code"] for name, kw in seen.items()} == {
        "AutoModelForCausalLM": False,
        "AutoTokenizer": False,
    }
    assert seen["AutoModelForCausalLM"]["use_safetensors"] is True


def test_batched_equals_sequential_with_exact_counts(hf, tiny_cfg):
    prompts = ["hi", "tell me a long story about a garden " * 3, "a b c", "why?", "x " * 20]
    reqs = [Request(f"r{i}", chat(p, system="be brief"), GREEDY) for i, p in enumerate(prompts)]
    batched = hf.generate(reqs)
    one_by_one = [hf.generate([r])[0] for r in reqs]
    assert [c.id for c in batched] == [r.id for r in reqs]
    assert batched == one_by_one  # same text, counts and finish reasons
    tok = hf.tokenizer
    for r, c in zip(reqs, batched):
        text = tok.apply_chat_template(list(r.messages), tokenize=False, add_generation_prompt=True)
        assert c.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])
        assert c.finish_reason == "length" and c.completion_tokens == GREEDY.max_new_tokens
        assert c.text and not c.error


def test_left_padding_keeps_greedy_output(hf):
    short = Request("short", chat("hi"), Sampling(max_new_tokens=16, temperature=0.0))
    alone = hf.generate([short])[0]
    longer = [Request(f"long{i}", chat("word " * (10 + 7 * i)), short.sampling) for i in range(3)]
    in_batch = {c.id: c for c in hf.generate([*longer, short])}["short"]
    assert in_batch == alone


def test_eos_stops_and_counts_like_plain_generate(hf):
    import torch

    req = Request("eos", chat("stop soon"), Sampling(max_new_tokens=20, temperature=0.0))
    ids = hf._prompt_ids(req)
    with torch.inference_mode():
        ref = hf.model.generate(
            torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=hf.eos_ids
        )[0, len(ids) :].tolist()
    assert hf.generate([req])[0].text == hf.tokenizer.decode(ref, skip_special_tokens=True)
    k = 5
    stop_token = ref[k]
    first = ref.index(stop_token)  # pretend the model's 6th token is its EOS
    saved = hf.eos_ids
    hf.eos_ids = [stop_token]
    try:
        c = hf.generate([req])[0]
    finally:
        hf.eos_ids = saved
    assert c.finish_reason == "stop"
    assert c.completion_tokens == first + 1  # the EOS token counts, as in vLLM
    assert c.text == hf.tokenizer.decode(ref[:first], skip_special_tokens=True)


def test_checkpoint_generation_defaults_are_ignored(hf, tmp_path):
    """A checkpoint's generation_config.json (sampling, repetition penalty, min length) does
    not leak into requests: the request's own sampling decides, as in vLLM."""
    import shutil

    model_dir = tmp_path / "tiny-with-defaults"
    shutil.copytree(tiny_model_dir("tiny"), model_dir)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=3.0, top_k=2, repetition_penalty=3.0, min_new_tokens=12)
    (model_dir / "generation_config.json").write_text(json.dumps(gen))
    other = build_engine(
        ModelConfig(name="d", path=str(model_dir), max_model_len=512), EngineConfig()
    )
    try:
        reqs = [Request(f"r{i}", chat(p), GREEDY) for i, p in enumerate(["hi", "a garden"])]
        assert other.generate(reqs) == hf.generate(reqs)
        assert other.checkpoint_generation_config.repetition_penalty == 3.0  # kept for reference
    finally:
        other.close()


def test_length_finish_and_too_long_prompt_is_an_error(hf):
    ok, too_long = hf.generate(
        [
            Request("ok", chat("hi"), Sampling(max_new_tokens=3, temperature=0.0)),
            Request("long", chat("word " * 600), Sampling(max_new_tokens=3, temperature=0.0)),
        ]
    )
    assert (ok.finish_reason, ok.completion_tokens) == ("length", 3)
    assert too_long.finish_reason == "error" and "max_model_len is 512" in too_long.error


def test_seeded_sampling_is_independent_of_batch(hf):
    s = Sampling(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=123)
    req = Request("sampled", chat("surprise me"), s)
    alone = hf.generate([req])[0]
    others = [
        Request(f"o{i}", chat("other prompt " * (i + 1)), Sampling(16, 1.0, 0.9, seed=i))
        for i in range(3)
    ]
    in_batch = {c.id: c for c in hf.generate([*others, req])}["sampled"]
    assert in_batch.text == alone.text
    reseeded = hf.generate([Request("sampled", req.messages, Sampling(16, 1.0, 0.9, seed=124))])
    assert reseeded[0].text != alone.text
    greedy = hf.generate([Request("g", req.messages, Sampling(16, 0.0))])[0]
    assert greedy.text != alone.text


def test_nosys_template_gets_the_system_prompt_folded():
    sys_text, user = "SYSTEM-RUBRIC: be baroque.", "Describe a door."
    req = Request("n", chat(user, system=sys_text), GREEDY)
    folded = build_engine(
        ModelConfig(name="nosys", path="builtin:tiny_nosys", system_role=False), EngineConfig()
    )
    c = folded.generate([req])[0]
    assert c.finish_reason == "length" and not c.error
    prompt = folded.tokenizer.decode(folded._prompt_ids(req))
    assert f"<|im_start|>user\n{sys_text}\n\n{user}<|im_end|>" in prompt
    assert "<|im_start|>system" not in prompt
    folded.close()
    # without the flag the template raises; the engine reports it instead of crashing
    unfolded = build_engine(ModelConfig(name="nosys", path="builtin:tiny_nosys"), EngineConfig())
    c = unfolded.generate([req])[0]
    assert c.finish_reason == "error" and "system_role: false" in c.error
    unfolded.close()


def test_json_schema_outputs_parse_and_validate(hf):
    reqs = [
        Request(
            f"j{i}",
            chat(f"Judge response {i}: " + "text " * i),
            Sampling(max_new_tokens=128, temperature=1.0, seed=i),
            JUDGE_SCHEMA,
        )
        for i in range(10)
    ]
    outs = hf.generate(reqs)
    parsed = [json.loads(c.text, strict=False) for c in outs if c.finish_reason == "stop"]
    assert len(parsed) >= 9, [c.text for c in outs]  # a random model, but the grammar closes it
    for value in parsed:
        assert schema_problems(value, JUDGE_SCHEMA) == []
        assert 0 <= value["score"] <= 100 and len(value["critique"]) <= CRITIQUE_MAX
    # greedy decoding of a random model fills the critique up to maxLength (400 chars, ~175
    # tokens here) before the grammar forces the closing quote
    greedy = hf.generate([Request("g", chat("judge"), Sampling(320, 0.0), JUDGE_SCHEMA)])[0]
    assert greedy.finish_reason == "stop"
    assert schema_problems(json.loads(greedy.text, strict=False), JUDGE_SCHEMA) == []


def test_adapter_changes_outputs_and_base_is_unaffected(hf, lora_dir):
    base_reqs = [Request(f"b{i}", chat(p), GREEDY) for i, p in enumerate(["hi", "a garden"])]
    base_before = hf.generate(base_reqs)
    lora_reqs = [
        Request(f"l{i}", r.messages, GREEDY, adapter=lora_dir) for i, r in enumerate(base_reqs)
    ]
    mixed = {c.id: c for c in hf.generate([base_reqs[0], *lora_reqs, base_reqs[1]])}
    assert [mixed[r.id] for r in base_reqs] == base_before
    assert all(mixed[lr.id].text != b.text for lr, b in zip(lora_reqs, base_before))
    assert hf.generate(base_reqs) == base_before  # adapters stay off for base requests
    again = hf.generate(lora_reqs)
    assert [c.text for c in again] == [mixed[lr.id].text for lr in lora_reqs]
    assert len(hf._adapters) == 1  # loaded once


def test_missing_adapter_is_an_error_not_a_crash(hf, tmp_path):
    bad, good = hf.generate(
        [
            Request("bad", chat("hi"), GREEDY, adapter=str(tmp_path / "none")),
            Request("good", chat("hi"), GREEDY),
        ]
    )
    assert bad.finish_reason == "error" and bad.error
    assert good.finish_reason == "length"


# -- OpenAI-compatible server --------------------------------------------------------------


class FakeServer:
    """A chat-completions endpoint in a thread: canned answers, scripted failures, counters."""

    def __init__(self, fail_first: int = 0, delay_s: float = 0.05) -> None:
        self.fail_first = fail_first
        self.delay_s = delay_s
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.auth: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.calls += 1
                    n = server.calls
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.bodies.append(body)
                    server.auth.add(self.headers.get("Authorization", ""))
                try:
                    time.sleep(server.delay_s)
                    user = body["messages"][-1]["content"]
                    if n <= server.fail_first or "ALWAYS500" in user:
                        return self._send(500, {"error": {"message": "overloaded"}})
                    if "BAD" in user:
                        return self._send(400, {"error": {"message": "bad request"}})
                    if "ECHOKEY" in user:  # a server that leaks the header into its error
                        return self._send(
                            503, {"error": {"message": self.headers["Authorization"]}}
                        )
                    content = json.dumps({"model": body["model"], "first": body["messages"][0]})
                    self._send(
                        200,
                        {
                            "id": "x",
                            "object": "chat.completion",
                            "created": 0,
                            "model": body["model"],
                            "choices": [
                                {
                                    "index": 0,
                                    "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": content},
                                }
                            ],
                            "usage": {
                                "prompt_tokens": 11,
                                "completion_tokens": 5,
                                "total_tokens": 16,
                            },
                        },
                    )
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def openai_engine(url: str, monkeypatch, **engine_kw):
    monkeypatch.setenv("CPT_TEST_KEY", "sk-secret-123")
    model = ModelConfig(name="srv", path="org/model", base_url=url, system_role=False)
    engine_cfg = EngineConfig(kind=EngineKind.openai, api_key_env="CPT_TEST_KEY", **engine_kw)
    return build_engine(model, engine_cfg)


def test_openai_retries_5xx_then_succeeds(server, monkeypatch):
    server.fail_first = 3
    engine = openai_engine(server.url, monkeypatch, max_retries=4, max_concurrency=1)
    (c,) = engine.generate([Request("a", chat("hello", system="SYS"), GREEDY)])
    assert c.finish_reason == "stop" and (c.prompt_tokens, c.completion_tokens) == (11, 5)
    assert server.calls == 4
    sent = json.loads(c.text)
    assert sent["model"] == "org/model"
    # system_role false: the system text is folded into the first user turn
    assert sent["first"] == {"role": "user", "content": "SYS\n\nhello"}
    assert server.auth == {"Bearer sk-secret-123"}
    engine.close()


def test_openai_errors_are_per_request_and_never_leak_the_key(server, monkeypatch):
    engine = openai_engine(server.url, monkeypatch, max_retries=2, max_concurrency=4)
    reqs = [
        Request("ok", chat("fine"), GREEDY),
        Request("bad", chat("BAD"), GREEDY),
        Request("down", chat("ALWAYS500"), GREEDY),
        Request("leak", chat("ECHOKEY"), GREEDY),
    ]
    ok, bad, down, leak = engine.generate(reqs)
    assert ok.finish_reason == "stop"
    assert bad.finish_reason == "error" and "400" in bad.error and "1 attempt" in bad.error
    assert down.finish_reason == "error" and "500" in down.error and "3 attempt" in down.error
    assert leak.finish_reason == "error" and "sk-secret-123" not in leak.error
    assert "***" in leak.error
    assert server.calls == 1 + 1 + 3 + 3
    engine.close()


def test_openai_concurrency_limit(server, monkeypatch):
    server.delay_s = 0.1
    engine = openai_engine(server.url, monkeypatch, max_concurrency=3)
    outs = engine.generate([Request(f"r{i}", chat(f"q{i}"), GREEDY) for i in range(12)])
    assert [c.id for c in outs] == [f"r{i}" for i in range(12)]
    assert all(c.finish_reason == "stop" for c in outs)
    assert server.max_in_flight == 3
    engine.close()


def test_openai_schema_and_adapter_routing(server, monkeypatch, tmp_path):
    engine = openai_engine(server.url, monkeypatch)
    adapter = tmp_path / "student-lora"
    adapter.mkdir()
    (c,) = engine.generate(
        [Request("j", chat("judge"), Sampling(64, 0.7, seed=5), JUDGE_SCHEMA, adapter=str(adapter))]
    )
    body = server.bodies[-1]
    assert json.loads(c.text)["model"] == adapter_name(str(adapter)) == body["model"]
    assert body["response_format"]["json_schema"]["schema"] == JUDGE_SCHEMA
    assert body["structured_outputs"] == {"json": JUDGE_SCHEMA}
    assert (body["seed"], body["max_tokens"], body["temperature"]) == (5, 64, 0.7)
    engine.close()


def test_openai_connection_refused_is_retried_then_an_error(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = openai_engine(f"http://127.0.0.1:{port}/v1", monkeypatch, max_retries=2)
    (c,) = engine.generate([Request("a", chat("hi"), GREEDY)])
    assert c.finish_reason == "error" and "Connection" in c.error and "3 attempt" in c.error
    engine.close()
