"""``lav2 serve`` on a tiny adapted model: a real server on 127.0.0.1, the real ``openai`` client, raw
HTTP for what a client would never send, and the generation queue and model loading in process.

Every answer the server gives is compared with what the library answers for the same conversation
(``infer.chat.reply``, greedy), so the server cannot pass by returning any text.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import mlflow
import openai
import pytest
import torch
import yaml
from live_servers import free_port, start, stop, wait_healthy
from PIL import Image
from tiny_adapted import random_gates, tiny_config, write_tiny_base
from typer.testing import CliRunner

from llama_adapter_v2.cli.main import app
from llama_adapter_v2.data.formatting import CHAT_SEPARATOR
from llama_adapter_v2.infer.chat import reply
from llama_adapter_v2.infer.generation import (
    GenerationSettings,
    Prompt,
    generate_completions,
    generate_streamed,
    generate_texts,
    instruction_prompt,
)
from llama_adapter_v2.infer.loading import LoadedModel, load_for_inference
from llama_adapter_v2.model.build import build_model
from llama_adapter_v2.model.checkpoint import save_adapter
from llama_adapter_v2.serve.served import load_served
from llama_adapter_v2.serve.worker import GenerationQueue, QueueFullError, ShuttingDownError

REPO = Path(__file__).resolve().parents[1]
KEY = "serve-test-key"
NAME = "tiny-adapter"
MAX_BODY = 64 * 1024
MAX_PIXELS = 64 * 64
QUESTION = "What is drawn in this picture?"


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


RED, BLUE = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (48, 40), (0, 90, 200))


def image_message(text: str, image: Image.Image) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": data_url(image)}}]}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    cfg = tiny_config(write_tiny_base(root / "base"))
    model = build_model(cfg).eval()
    random_gates(model, seed=2)
    return save_adapter(model, root / "adapter")


@pytest.fixture(scope="module")
def loaded(adapter: Path) -> LoadedModel:
    return load_for_inference(adapter)


def expected(loaded: LoadedModel, question: str, image: Image.Image | None = None,
             history: tuple[tuple[str, str], ...] = (), *, max_tokens: int = 16) -> str:
    """What the library answers: the server must answer the same (greedy)."""
    settings = GenerationSettings(max_new_tokens=max_tokens, stop=(CHAT_SEPARATOR,))
    answer = reply(loaded.model, loaded.tokenizer, image, question, history, settings=settings)  # type: ignore[arg-type]
    return answer.text


@pytest.fixture(scope="module")
def server(adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``lav2 serve`` as a user starts it, with an API key and small limits, on a free local port."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = dict(os.environ, LAV2_API_KEY=KEY, PYTHONPATH=str(REPO / "src"), LAV2_ROOT=str(REPO))
    command = [sys.executable, "-m", "llama_adapter_v2.cli.main", "serve", "--model", str(adapter),
               "--name", NAME, "--port", str(port), "--max-body-mb", str(MAX_BODY / 1024 / 1024),
               "--max-image-pixels", str(MAX_PIXELS), "--max-tokens", "16"]
    process = start(command, env, log, REPO)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client: openai.OpenAI, messages: list[dict[str, Any]], **options: Any) -> Any:
    options = {"max_tokens": 16, "temperature": 0, **options}
    return client.chat.completions.create(model=NAME, messages=messages, **options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the OpenAI client


def test_the_openai_client_gets_the_library_answer_about_an_image(client: openai.OpenAI,
                                                                   loaded: LoadedModel) -> None:
    red, blue = (ask(client, [image_message(QUESTION, image)]) for image in (RED, BLUE))
    assert red.choices[0].message.content == expected(loaded, QUESTION, RED)
    assert blue.choices[0].message.content == expected(loaded, QUESTION, BLUE)
    assert red.choices[0].message.content != blue.choices[0].message.content  # the image is used
    assert red.model == NAME and red.object == "chat.completion"
    assert red.choices[0].finish_reason in {"stop", "length"}
    assert red.usage is not None and red.usage.completion_tokens <= 16
    again = ask(client, [image_message(QUESTION, RED)])
    assert again.choices[0].message.content == red.choices[0].message.content  # greedy: deterministic


def test_a_streamed_answer_joins_to_the_unstreamed_one(client: openai.OpenAI) -> None:
    most_words = 0
    for image in (RED, BLUE):  # red's answer has two words, blue's one
        whole = ask(client, [image_message(QUESTION, image)])
        chunks = list(ask(client, [image_message(QUESTION, image)], stream=True,
                          stream_options={"include_usage": True}))
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == whole.choices[0].message.content
        words = len(whole.choices[0].message.content.split())
        most_words = max(most_words, words)
        assert len(pieces) >= min(words, 2)  # word by word, not in one piece at the end
        assert chunks[0].choices[0].delta.role == "assistant"
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [whole.choices[0].finish_reason]
        assert chunks[-1].usage is not None and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert most_words >= 2  # so some answer had to come in more than one piece


def test_earlier_turns_are_the_conversation(client: openai.OpenAI, loaded: LoadedModel) -> None:
    first = ask(client, [image_message(QUESTION, RED)]).choices[0].message.content
    follow_up = "And what colour is it?"
    messages = [{"role": "system", "content": "not used: the templates have no system slot"},
                image_message(QUESTION, RED), {"role": "assistant", "content": first},
                {"role": "user", "content": follow_up}]
    answer = ask(client, messages).choices[0].message.content
    assert answer == expected(loaded, follow_up, RED, (("user", QUESTION), ("assistant", first)))
    assert answer != expected(loaded, follow_up, RED)


def test_stop_strings_and_max_tokens_are_honoured(client: openai.OpenAI, loaded: LoadedModel) -> None:
    question = "Reverse the words."
    free = ask(client, [{"role": "user", "content": question}])
    text = free.choices[0].message.content
    assert text == expected(loaded, question) and len(text) > 6
    stop = text[3:5]
    stopped = ask(client, [{"role": "user", "content": question}], stop=[stop])
    assert stopped.choices[0].message.content == text[: text.index(stop)].strip()
    assert stopped.choices[0].finish_reason == "stop"
    streamed = ask(client, [{"role": "user", "content": question}], stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == stopped.choices[0].message.content
    short = ask(client, [{"role": "user", "content": question}], max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert short.choices[0].message.content == expected(loaded, question, max_tokens=2)


def test_sampling_is_seeded(client: openai.OpenAI) -> None:
    def sampled(seed: int) -> str:
        return ask(client, [{"role": "user", "content": "Describe it."}], temperature=1.5, top_p=0.9,
                   seed=seed).choices[0].message.content

    assert sampled(3) == sampled(3)
    assert len({sampled(seed) for seed in (3, 4, 5)}) > 1


def test_a_wrong_key_is_refused_and_the_page_and_health_stay_open(server: str) -> None:
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    for path in ("/v1/models", "/v1/chat/completions"):
        bare = httpx.request("GET" if path.endswith("models") else "POST", server + path, json={})
        assert bare.status_code == 401 and set(bare.json()["error"]) == {"message", "type", "param", "code"}
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "<title>lav2 chat</title>" in page.text
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["model"] == NAME and health["auth"] is True


def test_models_lists_the_served_model(client: openai.OpenAI, adapter: Path) -> None:
    [card] = client.models.list().data
    assert card.id == NAME and card.object == "model" and card.owned_by == "lav2"
    assert card.model_extra == {"version": None, "alias": None, "run_id": None, "source": str(adapter)}
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


# --------------------------------------------------------------------------- bad requests


def test_a_broken_image_is_400_and_the_server_still_answers(client: openai.OpenAI,
                                                             loaded: LoadedModel) -> None:
    broken = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    message = {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                           {"type": "image_url", "image_url": {"url": broken}}]}
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, [message])
    assert refused.value.code == "invalid_image"
    assert refused.value.param == "messages[0].content[1].image_url.url"
    assert "not a readable image" in refused.value.message
    still = ask(client, [image_message(QUESTION, RED)])
    assert still.choices[0].message.content == expected(loaded, QUESTION, RED)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/cat.png", "file:///etc/passwd", "/etc/passwd",
                                 "data:text/plain;base64,aGk=", "data:image/png,rawbytes"])
def test_image_urls_other_than_base64_data_urls_are_refused(client: openai.OpenAI, url: str) -> None:
    message = {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                           {"type": "image_url", "image_url": {"url": url}}]}
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, [message])
    assert refused.value.code == "invalid_image_url" and "fetches nothing" in refused.value.message


def test_limits_on_body_and_pixels(server: str, client: openai.OpenAI) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    padding = "x" * (MAX_BODY + 1)
    huge = httpx.post(f"{server}/v1/chat/completions", headers=headers,
                      json={"model": NAME, "messages": [{"role": "user", "content": padding}]})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(f"{server}/v1/chat/completions", headers=headers,
                         content=iter([b'{"model": "x", "messages": "', padding.encode(), b'"}']))
    assert chunked.status_code == 413  # no Content-Length: counted while read
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, [image_message(QUESTION, Image.new("RGB", (65, 64), "red"))])
    assert refused.value.code == "invalid_image" and "exceeds the limits" in refused.value.message


def test_malformed_json_wrong_shapes_and_long_contexts_are_refused_in_openai_shape(
    server: str, client: openai.OpenAI
) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{server}/v1/chat/completions"
    broken = httpx.post(url, headers=headers, content=b'{"model": "tiny-adapter", "messages": [')
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    for body, param in [({"model": NAME}, "messages"),
                        ({"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
                        ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "temperature": 3},
                         "temperature"),
                        ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "n": 2}, "n")]:
        shaped = httpx.post(url, headers=headers, json=body)
        assert shaped.status_code == 422, body
        error = shaped.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, [image_message(QUESTION, RED), image_message(QUESTION, BLUE)])
    assert "one image per conversation" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, [{"role": "user", "content": "words " * 300}])
    assert refused.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        ask(client, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])


def test_requests_that_once_were_500s_are_refused_or_answered(server: str, client: openai.OpenAI,
                                                               loaded: LoadedModel) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{server}/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    nested = httpx.post(url, headers=headers, content=b'{"model": "x", "messages": ' + b"[" * 30_000)
    assert nested.status_code == 400 and nested.json()["error"]["code"] == "invalid_json"
    for body, param in [({"model": NAME, "messages": hi, "seed": 2**63}, "seed"),
                        ({"model": NAME, "messages": hi, "seed": -(2**63) - 1}, "seed"),
                        ({"model": NAME, "messages": hi * 257}, "messages")]:
        shaped = httpx.post(url, headers=headers, json=body)
        assert shaped.status_code == 422 and shaped.json()["error"]["param"] == param, body
    no_comma = {"type": "image_url", "image_url": {"url": "data:image/png;base64"}}
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, [{"role": "user", "content": [{"type": "text", "text": QUESTION}, no_comma]}])
    assert refused.value.code == "invalid_image_url"
    tiny_temperature = ask(client, [{"role": "user", "content": "Describe it."}], temperature=1e-300,
                           seed=2**62)
    assert tiny_temperature.choices[0].message.content == expected(loaded, "Describe it.")  # greedy
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_a_second_image_is_refused_before_any_image_is_decoded(client: openai.OpenAI) -> None:
    broken = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    parts = [{"type": "image_url", "image_url": {"url": broken}}] * 40
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, [{"role": "user", "content": [{"type": "text", "text": QUESTION}, *parts]}])
    assert "one image per conversation" in refused.value.message  # not "invalid_image": none was decoded
    assert refused.value.param == "messages[0].content"


def test_concurrent_clients_each_get_their_own_answer(server: str, client: openai.OpenAI,
                                                      loaded: LoadedModel) -> None:
    questions = (QUESTION, "Describe it.", "What colour is the sky?")
    asks = [(q, image) for q in questions for image in (RED, BLUE, None)]

    def one(question_and_image: tuple[str, Image.Image | None]) -> str:
        question, image = question_and_image
        message = image_message(question, image) if image else {"role": "user", "content": question}
        return ask(client, [message]).choices[0].message.content

    before = httpx.get(server + "/health").json()
    with ThreadPoolExecutor(max_workers=len(asks)) as pool:
        answers = list(pool.map(one, asks))
    after = httpx.get(server + "/health").json()
    assert answers == [expected(loaded, question, image) for question, image in asks]
    assert after["answered"] - before["answered"] == len(asks)
    assert after["batches"] - before["batches"] < len(asks) and after["largest_batch"] > 1  # some batched


# --------------------------------------------------------------------------- in process


def test_the_queue_batches_waiting_greedy_requests_and_runs_others_alone(loaded: LoadedModel) -> None:
    queue = GenerationQueue(loaded.model, loaded.tokenizer, max_batch=3, max_waiting=6)
    greedy = GenerationSettings(max_new_tokens=8)
    sampled = GenerationSettings(max_new_tokens=8, temperature=1.2, seed=7)
    prompts = [instruction_prompt("Describe it."), instruction_prompt("Reverse the words.", "a b c"),
               Prompt(instruction_prompt(QUESTION).text, RED), instruction_prompt("What colour is the sky?")]
    futures = [queue.submit(p, greedy) for p in prompts] + [queue.submit(prompts[0], sampled)]
    pieces: list[str] = []
    futures.append(queue.submit(prompts[2], greedy, pieces.append))
    with pytest.raises(QueueFullError):
        queue.submit(prompts[0], greedy)
    queue.start()
    try:
        found = [future.result(timeout=120) for future in futures]
    finally:
        queue.close()
    alone = [generate_texts(loaded.model, loaded.tokenizer, [p], greedy)[0] for p in prompts]
    assert [c.text for c in found[:4]] == alone
    assert found[4].text == generate_texts(loaded.model, loaded.tokenizer, [prompts[0]], sampled)[0]
    assert "".join(pieces) == found[5].text == alone[2]
    # 3 greedy together, the 4th greedy alone (max_batch), the sampled and the streamed alone
    assert (queue.stats.batches, queue.stats.largest_batch, queue.stats.answered) == (4, 3, 6)


def test_prompts_with_and_without_an_image_are_not_batched_together(loaded: LoadedModel) -> None:
    queue = GenerationQueue(loaded.model, loaded.tokenizer, max_batch=3)
    greedy = GenerationSettings(max_new_tokens=4)
    prompts = [instruction_prompt("Describe it."), Prompt(instruction_prompt(QUESTION).text, RED),
               instruction_prompt("What colour is the sky?")]
    futures = [queue.submit(p, greedy) for p in prompts]
    queue.start()
    try:
        [future.result(timeout=120) for future in futures]
    finally:
        queue.close()
    assert (queue.stats.batches, queue.stats.largest_batch) == (2, 2)


def test_shutdown_refuses_waiting_requests_and_ends_the_running_one(loaded: LoadedModel) -> None:
    queue = GenerationQueue(loaded.model, loaded.tokenizer, max_batch=1)
    long = GenerationSettings(max_new_tokens=100, stop=())
    started = threading.Event()

    def hold_on(_: str) -> None:  # the first answer is still being generated when close() is called
        started.set()
        queue._stopping.wait(30)

    futures = [queue.submit(instruction_prompt("Describe it."), long, hold_on)]
    futures += [queue.submit(instruction_prompt(f"Question {i}"), long) for i in range(4)]
    queue.start()
    assert started.wait(120)
    began = time.monotonic()
    queue.close(timeout_s=30)
    assert time.monotonic() - began < 30 and not queue._thread.is_alive()
    for future in futures:
        with pytest.raises(ShuttingDownError):
            future.result(timeout=1)
    with pytest.raises(ShuttingDownError):
        queue.submit(instruction_prompt("Too late."), long)


def test_a_cancelled_stream_stops_generating(loaded: LoadedModel) -> None:
    queue = GenerationQueue(loaded.model, loaded.tokenizer)
    settings = GenerationSettings(max_new_tokens=60, stop=())
    client_gone = threading.Event()
    future = queue.submit(instruction_prompt("Describe it."), settings, lambda _: None, client_gone)
    client_gone.set()  # the client left while its request waited
    queue.start()
    try:
        cut = future.result(timeout=120)
    finally:
        queue.close()
    assert cut.new_tokens == 1 and queue.stats.cancelled == 1  # ended after the first token


@pytest.mark.parametrize("stop", [(), (CHAT_SEPARATOR,), ("e",), (" ",), ("qq", "\n")])
def test_streamed_pieces_join_to_the_generated_answer(loaded: LoadedModel, stop: tuple[str, ...]) -> None:
    with_image = Prompt(instruction_prompt(QUESTION).text, BLUE)
    for prompt in (instruction_prompt("Reverse the words.", "red blue"), with_image):
        settings = GenerationSettings(max_new_tokens=24, stop=stop)
        pieces: list[str] = []
        streamed = generate_streamed(loaded.model, loaded.tokenizer, prompt, settings, pieces.append)
        [whole] = generate_completions(loaded.model, loaded.tokenizer, [prompt], settings)
        assert streamed == whole and "".join(pieces) == whole.text
        assert all(pieces)


def test_a_registry_alias_is_served_as_the_version_it_names(tmp_path: Path, adapter: Path,
                                                           loaded: LoadedModel) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("serve", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(adapter), "adapter")
    client.create_registered_model("served")
    for _ in range(2):
        client.create_model_version("served", f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    client.set_registered_model_alias("served", "champion", "1")
    model, card = load_served("models:/served@champion", tracking_uri=uri)
    assert (card.id, card.version, card.alias) == ("served@champion", "1", "champion")
    assert card.run_id == run.info.run_id
    saved = loaded.model.adapter_state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in model.model.adapter_state_dict().items())
    _, by_number = load_served("models:/served/2", tracking_uri=uri, name="pinned")
    assert (by_number.id, by_number.version, by_number.alias) == ("pinned", "2", None)
    client.create_model_version("served", f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id)
    _, latest = load_served("models:/served/latest", tracking_uri=uri)
    assert (latest.id, latest.version, latest.alias) == ("served/latest", "3", None)
    client.create_registered_model("empty")
    with pytest.raises(mlflow.exceptions.MlflowException, match="has no versions"):
        load_served("models:/empty/latest", tracking_uri=uri)
    _, by_run = load_served(f"runs:/{run.info.run_id}", tracking_uri=uri)
    assert (by_run.version, by_run.run_id) == (None, run.info.run_id)


@pytest.mark.slow
def test_the_serve_champion_flow_serves_the_version_the_alias_names(tmp_path: Path, adapter: Path) -> None:
    """The Prefect flow (flows/serve.py) as a deployment runs it: a flow run that is the server."""
    cfg = tiny_config(write_tiny_base(tmp_path / "base"))
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg.tracking.registered_model = "served-by-flow"
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    experiment = client.create_experiment("serve", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(adapter), "adapter")
    client.create_registered_model("served-by-flow")
    for _ in range(2):
        client.create_model_version("served-by-flow", f"{run.info.artifact_uri}/adapter",
                                    run_id=run.info.run_id)
    client.set_registered_model_alias("served-by-flow", "champion", "2")
    config_file = tmp_path / "serve.yaml"
    settings = cfg.model_dump(mode="json")  # a whole project's config: data sources named, never read here
    captions = {"name": "c", "format": "coco", "annotations": str(tmp_path / "c.json"),
                "images": str(tmp_path)}
    instructions = {"name": "i", "format": "alpaca", "path": str(tmp_path / "i.json")}
    settings["data"] |= {"captions": [captions], "instructions": [instructions]}
    config_file.write_text(yaml.safe_dump(settings), encoding="utf-8")
    port = free_port()
    code = (f"from flows.serve import serve_champion; serve_champion({str(config_file)!r}, port={port})")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'src'}", LAV2_ROOT=str(REPO),
               PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("LAV2_API_KEY", None)
    log = tmp_path / "flow.log"
    process = start([sys.executable, "-c", code], env, log, REPO)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", process, log, timeout_s=240)
        [model] = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        assert (model["id"], model["version"], model["alias"]) == ("served-by-flow@champion", "2", "champion")
    finally:
        stop(process)
    assert "Beginning flow run" in log.read_text(encoding="utf-8")  # a Prefect flow run, not a bare call


def test_serve_refuses_a_model_that_is_not_there(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "not an adapter folder" in result.stderr


# --------------------------------------------------------------------------- the chat page


@pytest.fixture(scope="module")
def browser(require: Callable[[bool, str], None]) -> Iterator[Any]:
    """Headless Chromium from the system package (Debian: chromium), driven by playwright; no download."""
    chromium = shutil.which("chromium")
    require(chromium is not None, "the chat page test needs the chromium package (apt-get install chromium)")
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only where chromium is there

    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=chromium, headless=True,
                                         args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield launched
        launched.close()


# Records every text the newest answer shows, so the test sees it grow while it streams.
WATCH_ANSWERS = """() => {
  window.shown = [];
  new MutationObserver(() => {
    const answers = document.querySelectorAll('.assistant');
    if (answers.length) window.shown.push(answers[answers.length - 1].textContent);
  }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
}"""


def test_the_page_asks_for_the_key_then_chats_about_an_uploaded_image(
    browser: Any, server: str, loaded: LoadedModel
) -> None:
    page = browser.new_page()
    page.goto(server + "/")
    page.wait_for_selector("#key-form:not([hidden])")
    assert "needs an API key" in page.inner_text("#key-note") and page.is_disabled("#send")
    page.fill("#key", "wrong")
    page.click("#key-use")
    page.wait_for_function("() => document.getElementById('key-note').textContent.includes('refused')")
    page.fill("#key", KEY)
    page.click("#key-use")
    page.wait_for_function("() => document.getElementById('model').textContent.startsWith('model ')")
    assert page.inner_text("#model") == f"model {NAME}" and page.is_hidden("#key-form")
    buffer = io.BytesIO()
    RED.save(buffer, "PNG")
    upload = {"name": "red.png", "mimeType": "image/png", "buffer": buffer.getvalue()}
    page.set_input_files("#image", files=[upload])
    page.wait_for_selector("#preview:not([hidden])")
    page.fill("#max-tokens", "16")
    page.evaluate(WATCH_ANSWERS)

    def ask_on_page(question: str) -> str:
        page.fill("#question", question)
        page.press("#question", "Enter")
        page.wait_for_function("() => document.getElementById('status').textContent === '' && "
                               "!document.getElementById('send').disabled")
        return page.locator(".assistant").last.inner_text()

    first = ask_on_page(QUESTION)
    assert first == expected(loaded, QUESTION, RED)
    shown = page.evaluate("window.shown")
    assert any(0 < len(text) < len(first) and first.startswith(text) for text in shown)  # it streamed
    follow_up = "And what colour is it?"
    history = (("user", QUESTION), ("assistant", first))
    assert ask_on_page(follow_up) == expected(loaded, follow_up, RED, history)
    assert page.locator(".user").all_inner_texts() == [QUESTION, follow_up]
    assert page.locator(".error").count() == 0
    page.close()


def test_the_load_benchmark_counts_what_the_server_answered(server: str) -> None:
    """benchmarks/serve_load.py against the test server: structure and counts, never a time."""
    from benchmarks.serve_load import markdown, measure_level, percentile, request_body  # noqa: PLC0415

    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0 and percentile([3.0, 1.0, 2.0, 4.0], 0.95) == 4.0
    level = measure_level(server, request_body(NAME, 4), clients=3, requests=5,
                          headers={"Authorization": f"Bearer {KEY}"})
    assert (level["answered"], level["failed"]) == (5, 0)
    assert 0 < level["p50_s"] <= level["p95_s"] <= level["wall_s"]  # each request within the level's time
    assert level["requests_per_s"] == pytest.approx(5 / level["wall_s"])
    refused = measure_level(server, request_body(NAME, 4), clients=2, requests=2)  # no key
    assert (refused["answered"], refused["failed"]) == (0, 2) and refused["failures"][0].startswith("401")
    table = markdown({"started_utc": "now", "model": NAME, "max_tokens": 4, "threads": 2, "max_batch": 8,
                      "machine": "test", "load_average_1m": 0.0,
                      "levels": [{**level, "batches": 2, "largest_batch": 3}]})
    assert "| 3 | 5 | 5 | 0 |" in table
