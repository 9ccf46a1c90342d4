"""/v1/completions on the in-flight batching engine: token ids equal Hugging Face generate, streamed or not."""
import json
import threading
import urllib.request

import pytest
import torch

from blade.models.hf_lm import gpt2_tiny


def complete(server, body: dict) -> tuple[int, dict | list]:
    request = urllib.request.Request(f"http://{server.url}/v1/completions", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    if body.get("stream"):
        events = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        return 200, [json.loads(e) for e in events[:-1]]
    return 200, json.loads(text)


@pytest.fixture(scope="module")
def hf_greedy():
    model = gpt2_tiny()

    def tokens(prompt, new):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
        return out[0, len(prompt):].tolist()

    return tokens


PROMPTS = [[5, 17, 99, 3], [400, 2, 2, 7, 81, 9, 11], [1]]


def test_greedy_tokens_equal_hf_generate(server, hf_greedy):
    status, answer = complete(server, {"model": "lm", "prompt": PROMPTS, "max_tokens": 12, "temperature": 0})
    assert status == 200, answer
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS, answer["choices"]):
        assert choice["token_ids"] == hf_greedy(prompt, 12) and choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 12, "completion_tokens": 36, "total_tokens": 48}


def test_streamed_tokens_are_the_same_tokens(server, hf_greedy):
    status, chunks = complete(server, {"prompt": PROMPTS[1], "max_tokens": 9, "temperature": 0, "stream": True})
    assert status == 200
    streamed = [t for chunk in chunks for t in chunk["choices"][0]["token_ids"]]
    assert streamed == hf_greedy(PROMPTS[1], 9)
    assert len(chunks) >= 5, "tokens came in one piece: not streamed"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_each_get_what_they_get_alone(server, hf_greedy):
    prompts = [[(7 * i + j) % 500 for j in range(3 + i % 5)] for i in range(10)]
    lengths = [4 + (i * 3) % 11 for i in range(10)]
    answers = {}

    def client(i):
        answers[i] = complete(server, {"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(10):
        status, answer = answers[i]
        assert status == 200 and answer["choices"][0]["token_ids"] == hf_greedy(prompts[i], lengths[i]), i


def test_sampling_with_a_seed_is_reproducible(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    first, second = complete(server, body)[1], complete(server, body)[1]
    assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"]
    other = complete(server, {**body, "seed": 99})[1]
    assert len(other["choices"][0]["token_ids"]) == 10


@pytest.mark.parametrize("body, message", [
    ({"prompt": "hello"}, "token ids"),
    ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens"),
    ({"prompt": [1, 2], "max_tokens": 500}, "max length 128"),
    ({"prompt": [1, 100000]}, "token ids must be in"),
    ({"prompt": [1, 2], "n": 2}, "n=1 only"),
    ({"prompt": [1, 2], "temperature": -1}, "temperature"),
])
def test_bad_completion_requests_get_400(server, body, message):
    status, answer = complete(server, body)
    assert status == 400 and message in answer["error"]["message"], answer
    assert complete(server, {"prompt": [1, 2], "max_tokens": 2, "temperature": 0})[0] == 200


def test_unknown_model_is_404(server):
    status, answer = complete(server, {"model": "nope", "prompt": [1]})
    assert status == 404 and "no language model 'nope'" in answer["error"]["message"]


def test_a_saved_lm_serves_without_its_code(tmp_path, hf_greedy):
    import blade.llm
    from tests.serve.conftest import Server

    blade.llm.compile(gpt2_tiny(), max_batch=2, max_length=64).save(tmp_path / "lm.blade")
    server = Server(["--lm", tmp_path / "lm.blade", "--lm-name", "tiny", "--no-grpc"], tmp_path / "server.log")
    try:
        server.wait_live()
        server.wait_ready(["tiny"])
        status, answer = complete(server, {"model": "tiny", "prompt": PROMPTS[:2], "max_tokens": 7, "temperature": 0})
        assert status == 200, answer
        assert [c["token_ids"] for c in answer["choices"]] == [hf_greedy(p, 7) for p in PROMPTS[:2]]
        status, answer = complete(server, {"model": "tiny", "prompt": [1] * 60, "max_tokens": 10})
        assert status == 400 and "max length 64" in answer["error"]["message"]
    finally:
        server.stop()
