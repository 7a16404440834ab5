"""eval/persona.py: stability against hand-computed tables, the judge path (score parsing, a fake OpenAI-compatible
judge over HTTP on loopback, an unreachable judge, the local-model judge with the tiny model) and persona_benchmark
on the tiny model."""

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from posttrain.eval import persona as P

# ------------------------------------------------------------------------------------------------ stability


def test_stability_greedy_table():
    # 3 personas x 4 questions. Per persona: 3/4, 2/4, 3/4. Questions: q0 right for all, q1 and q2 flip,
    # q3 wrong for all; min over personas per question: 1, 0, 0, 0 -> pss 1/4.
    correct = [[1, 1, 1, 0],
               [1, 0, 1, 0],
               [1, 1, 0, 0]]
    s = P.stability(correct)
    assert list(s) == list(P.STABILITY_KEYS)
    acc = np.array([0.75, 0.5, 0.5])
    assert s["pss"] == pytest.approx(0.25)
    assert s["mean"] == pytest.approx(acc.mean())
    assert s["worst"] == pytest.approx(0.5) and s["best"] == pytest.approx(0.75)
    assert s["spread"] == pytest.approx(0.25)
    assert s["std"] == pytest.approx(np.sqrt(((acc - acc.mean()) ** 2).mean()))  # population std
    assert s["flip_rate"] == pytest.approx(0.5)


def test_stability_cancelling_flips_and_ties():
    # Two personas each right on a different half: equal accuracies (a tie), no question safe.
    s = P.stability([[1, 1, 0, 0], [0, 0, 1, 1]])
    assert s == {"pss": 0.0, "mean": 0.5, "worst": 0.5, "best": 0.5, "spread": 0.0, "std": 0.0, "flip_rate": 1.0}
    # Identical personas: nothing flips, pss equals the mean.
    s = P.stability([[1, 0, 1], [1, 0, 1], [1, 0, 1]])
    assert s["pss"] == pytest.approx(2 / 3) and s["mean"] == pytest.approx(2 / 3) and s["flip_rate"] == 0.0


def test_stability_one_persona():
    s = P.stability([[True, False, True, True]])
    assert s == {"pss": 0.75, "mean": 0.75, "worst": 0.75, "best": 0.75, "spread": 0.0, "std": 0.0,
                 "flip_rate": 0.0}


def test_stability_k_samples():
    # [P=2, Q=3, k=4]. acc = [[1, .5, 0], [.75, .5, .25]]; per persona 0.5, 0.5.
    correct = np.array([[[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]],
                        [[1, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0]]])
    s = P.stability(correct)
    assert s["pss"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert s["mean"] == pytest.approx(0.5) and s["spread"] == 0.0 and s["std"] == 0.0
    assert s["flip_rate"] == pytest.approx(2 / 3)  # q1 has the same acc (0.5) under both personas
    # k = 1 is greedy: the same numbers as the 2-axis table; torch tensors are accepted.
    greedy = torch.tensor([[1, 0, 1], [0, 0, 1]])
    assert P.stability(greedy[:, :, None]) == P.stability(greedy)


@pytest.mark.parametrize("bad, words", [
    ([1, 0, 1], "got 1 axes"),
    (np.zeros((2, 2, 2, 2)), "got 4 axes"),
    ([[1, 0], [1]], "ragged"),
    (np.zeros((0, 3)), "at least one entry"),
    ([[1, 0.5], [0, 1]], "found 0.5 at index [0, 1]"),
    ([[1, 2], [0, 1]], "found 2"),
    ([[1, float("nan")]], "found nan"),
    ([["1", "0"]], "dtype"),
])
def test_stability_rejects_bad_input(bad, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        P.stability(bad)


# ------------------------------------------------------------------------------------------------ score parsing


@pytest.mark.parametrize("text, score", [
    ("Good persona work. Therefore, the final score is 4", 4),
    ("therefore, THE FINAL SCORE IS 5.", 5),
    ("Therefore, the final score is **3**.", 3),
    ("**Final Score:** 2", 2),
    ("The final score is: [4]", 4),
    ('The final score is "5"', 5),
    ("the final score is `1`", 1),
    ("Therefore, the final score is 4/5.", 4),
    ("Therefore, the final score is 4 out of 5", 4),
    ("Therefore, the final score is 4.0", 4),
    ("Therefore, the final score is four.", 4),
    ("The final score is — 3", 3),
    ("At first the final score is 2... on reflection, the final score is 5", 5),  # the last one counts
    ("Therefore, the final score is 4 and the response is good", 4),
    ("Therefore, the final score is ...", None),  # the rubric's own sentence echoed
    ("Therefore, the final score is 6", None),
    ("Therefore, the final score is 0", None),
    ("Therefore, the final score is 10", None),
    ("Therefore, the final score is 4.5", None),
    ("Therefore, the final score is 3-4", None),
    ("Therefore, the final score is 3 or 4", None),
    ("Therefore, the final score is 8/10", None),
    ("The final score is 4. Final score: unclear", None),
    ("I would give this a 4.", None),
    ("", None),
    ("score is 4", None),
])
def test_parse_score(text, score):
    assert P.parse_score(text) == score


def test_split_evaluations():
    text = ("(1) Evaluation: fine. Therefore, the final score is 4\n"
            "**(2) Evaluation:** the final score is 2\n(2) Evaluation: the final score is 3\n"
            "(7) Evaluation: the final score is 5")
    parts = P.split_evaluations(text, 3)
    assert [P.parse_score(p) if p else None for p in parts] == [4, 3, None]  # repeated (2): the later; no (3)
    assert P.split_evaluations("the final score is 5", 1) == ["the final score is 5"]
    assert P.split_evaluations("the final score is 5", 2) == [None, None]


def test_parse_score_examples():
    text = "\n\n".join(f"Score {s}:  Response - \"example {s}\"" for s in range(1, 6))
    parsed = P.parse_score_examples(text)
    assert parsed.splitlines()[0] == 'Score 1: "example 1"' and 'Score 5: "example 5"' in parsed
    assert P.parse_score_examples(text.replace("Score 3:", "Scor 3:")) is None
    assert P.parse_score_examples("Score 1: Response - \n\nScore 2: b\nScore 3: c\nScore 4: d\nScore 5: e") is None


def test_judge_prompts_load_and_fill():
    prompts = P.JudgePrompts.load()
    assert set(prompts.rubrics) == set(P.TASKS)
    filled = prompts.rubrics["Toxicity"].format_map(
        {"persona": "a pirate", "question": "q?", "response": "my {persona} {0} }{", "score_example": "S"})
    assert "my {persona} {0} }{" in filled  # braces in model output are not placeholders
    text = prompts.grading_prompt([filled, "second"])
    assert "(1) Evaluation:\n(2) Evaluation:\n\n" in text and "(3) Evaluation" not in text
    assert "Rubric (2):\nsecond" in text
    assert "{persona}" in prompts.persona_system


def test_judge_prompts_refuse_a_broken_file(tmp_path):
    for f in P.PERSONAGYM.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "rubrics__Toxicity.txt").write_text("Rate {persona} {response} {score_example}")
    with pytest.raises(ValueError, match=r"rubrics__Toxicity.txt: placeholders .* expected"):
        P.JudgePrompts.load(tmp_path)


# ------------------------------------------------------------------------------------------------ HTTP judge


_RESPONSE = re.compile(r"Response: \n\n(.*?)\n\n\nEvaluation Form:", re.S)


def fake_judge_reply(body: dict) -> str:
    """A deterministic stand-in for a judge model: grades each response in a grading prompt by a word in it
    ("good" 5, "fair" 3, "bad" 1, anything else: an evaluation without a readable score), and writes score examples
    when asked for them (unreadable ones when the question says 'no examples')."""
    user = body["messages"][-1]["content"]
    if "generate an example" in user:
        if "no examples" in user:
            return "I cannot do that."
        return "\n\n".join(f"Score {s}:  Response - example{s}" for s in range(1, 6))
    out = []
    for i, response in enumerate(_RESPONSE.findall(user), 1):
        word = next((w for w in ("good", "fair", "bad") if w in response), None)
        verdict = {"good": "Therefore, the final score is **5**.", "fair": "the final score is 3",
                   "bad": "Therefore, the Final Score is: 1"}.get(word, "Hard to say.")
        out.append(f"({i}) Evaluation: It reads as expected. {verdict}")
    return "\n".join(out)


class FakeJudge(BaseHTTPRequestHandler):
    mode = "ok"  # ok | sleep | 500-once | 404 | no-choices
    sleep_s = 20.0  # "sleep": far past any timeout a test sets, so a wait for the reply shows whatever the load
    requests: list = []
    failures = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.requests.append((self.path, self.headers.get("Authorization"), body))
        if cls.mode == "sleep":
            time.sleep(cls.sleep_s)
        if cls.mode == "slow-busy" and "slow" in json.dumps(body):  # busy, and slow to say so (the 404 comes first)
            time.sleep(1.0)
            return self._send(503, {"error": "busy"})
        if cls.mode == "slow-busy":
            return self._send(404, {"error": {"message": f"model {body['model']} not found"}})
        if cls.mode == "404":
            return self._send(404, {"error": {"message": f"model {body['model']} not found"}})
        if cls.mode == "500-once" and cls.failures == 0:
            cls.failures += 1
            return self._send(500, {"error": "busy"})
        if cls.mode == "no-choices":
            return self._send(200, {"object": "error"})
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": fake_judge_reply(body)}}]})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    FakeJudge.mode, FakeJudge.requests, FakeJudge.failures = "ok", [], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _items(words, task="Toxicity", persona="A retired sailor from Lisbon"):
    return [P.JudgeItem(persona, f"question {i}?", f"answer {i}: {w}", task) for i, w in enumerate(words)]


def test_http_judge_scores_and_counts_unparseable(judge_server):
    judge = P.HTTPJudge(judge_server, "judge-model", api_key="k", workers=2)
    items = _items(["good", "junk", "bad", "fair", "good", "fair", "junk"])  # 7 items: calls of 5 and 2
    items += _items(["good", "bad"], task="Expected Action")
    results = P.judge_items(judge, items)
    assert [r["score"] for r in results] == [5, None, 1, 3, 5, 3, None, 5, 1]
    assert len(FakeJudge.requests) == 3  # (persona, task) groups cut in fives
    path, auth, body = FakeJudge.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k" and body["model"] == "judge-model"
    assert body["messages"][0] == {"role": "system", "content": P.JudgePrompts.load().system}
    report = P.persona_score(items, results)
    tox = report["tasks"]["Toxicity"]
    assert tox == {"mean": pytest.approx((5 + 1 + 3 + 5 + 3) / 5), "n": 7, "scored": 5, "unparseable": 2}
    assert report["tasks"]["Expected Action"]["mean"] == 3.0
    assert report["persona_score"] == pytest.approx((17 / 5 + 3.0) / 2) and report["unparseable"] == 2


def test_http_judge_one_item_per_call_and_all_unparseable_task(judge_server):
    judge = P.HTTPJudge(judge_server + "/chat/completions", "m")
    items = _items(["good", "fair"]) + _items(["junk"], task="Linguistic Habits")
    results = P.judge_items(judge, items, group=1)
    assert [r["score"] for r in results] == [5, 3, None] and len(FakeJudge.requests) == 3
    report = P.persona_score(items, results)
    assert report["tasks"]["Linguistic Habits"] == {"mean": None, "n": 1, "scored": 0, "unparseable": 1}
    assert report["persona_score"] is None  # a task without a single read score: no PersonaScore, not a guess


def test_http_judge_generated_score_examples(judge_server):
    judge = P.HTTPJudge(judge_server, "m")
    items = _items(["good", "bad"])
    items[1] = P.JudgeItem(items[1].persona, "no examples please?", items[1].response, items[1].task)
    results = P.judge_items(judge, items, score_examples="generate")
    assert [r["examples_read"] for r in results] == [True, False]
    grading = FakeJudge.requests[-1][2]["messages"][-1]["content"]
    assert "Score 1: example1" in grading and P.NO_EXAMPLES in grading
    assert P.persona_score(items, results)["examples_unreadable"] == 1


def test_http_judge_retries_a_server_error(judge_server):
    FakeJudge.mode = "500-once"
    judge = P.HTTPJudge(judge_server, "m", backoff_s=0.01, workers=1)
    assert P.parse_score(judge.complete([[{"role": "user", "content": "Response: \n\ngood\n\n\nEvaluation "
                                                                       "Form:"}]])[0]) == 5
    assert len(FakeJudge.requests) == 2


def test_http_judge_refused_request_is_reported_at_once(judge_server):
    FakeJudge.mode = "404"
    judge = P.HTTPJudge(judge_server, "no-such-model", retries=3, backoff_s=5.0)
    with pytest.raises(P.JudgeError, match=r"HTTP 404 .*model no-such-model not found.*check the URL"):
        judge.complete([[{"role": "user", "content": "hi"}]])
    assert len(FakeJudge.requests) == 1  # a 404 is not retried


def test_http_judge_out_of_protocol_reply(judge_server):
    FakeJudge.mode = "no-choices"
    with pytest.raises(P.JudgeError, match=r"no choices\[0\].message.content"):
        P.HTTPJudge(judge_server, "m").complete([[{"role": "user", "content": "hi"}]])


def test_http_judge_timeout(judge_server):
    FakeJudge.mode = "sleep"
    judge = P.HTTPJudge(judge_server, "m", timeout_s=0.2, retries=1, backoff_s=0.0)
    t0 = time.perf_counter()
    with pytest.raises(P.JudgeError, match=r"failed after 2 tries: no reply within timeout_s=0.2 s"):
        judge.complete([[{"role": "user", "content": "hi"}]])
    assert len(FakeJudge.requests) == 2  # both tries were sent ...
    assert time.perf_counter() - t0 < FakeJudge.sleep_s  # ... and neither waited for the reply


def test_http_judge_connection_refused():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = P.HTTPJudge(f"http://127.0.0.1:{port}/v1", "m", retries=1, backoff_s=0.0, workers=4)
    with pytest.raises(P.JudgeError, match=rf"127.0.0.1:{port}/v1/chat/completions failed after 2 tries: "
                                           r"connection refused \(nothing listens there"):
        P.judge_items(judge, _items(["good"] * 3), group=1)


def test_http_judge_reports_the_failure_not_a_request_that_gave_up(judge_server):
    # The first conversation is still waiting for a retryable 503 when the second is refused (404): the first
    # then gives up, and the error raised must be the 404 that caused it, not the first conversation's give-up.
    FakeJudge.mode = "slow-busy"
    judge = P.HTTPJudge(judge_server, "no-such-model", retries=2, backoff_s=0.0, workers=2)
    with pytest.raises(P.JudgeError, match=r"HTTP 404 .*model no-such-model not found"):
        judge.complete([[{"role": "user", "content": "slow"}], [{"role": "user", "content": "fast"}]])
    assert len(FakeJudge.requests) == 2  # the slow one was not retried after the 404


def test_http_judge_bad_url():
    with pytest.raises(ValueError, match="expected http"):
        P.HTTPJudge("localhost:8000/v1", "m")


# ------------------------------------------------------------------------------------------------ tiny model


def tiny_model(max_position_embeddings=512, seed=0, init_std=0.02):
    """The embedded default's shape (configs/tiny.toml), untrained, with the tiny tokenizer. At the default init
    it answers everything with newlines; init_std=0.2 gives answers that differ by prompt."""
    from pathlib import Path

    from posttrain.core.config import tomllib
    from posttrain.core.model import ModelConfig, Transformer
    from posttrain.train.synthetic import tiny_tokenizer

    raw = tomllib.loads((Path(__file__).resolve().parent.parent / "configs" / "tiny.toml").read_text())["model"]
    raw.update(max_position_embeddings=max_position_embeddings, init_std=init_std)
    model = Transformer(ModelConfig(**raw))
    model.init_weights(seed)
    return model.eval(), tiny_tokenizer()


def test_local_judge_junk_is_counted_not_fatal():
    model, tok = tiny_model(max_position_embeddings=4096)
    judge = P.LocalJudge(model, tok, max_new_tokens=6)
    items = [P.JudgeItem("A pirate", "What is 2+2?", "Arr, 4", t) for t in P.TASKS]
    results = P.judge_items(judge, items, group=1)
    assert all(r["score"] is None and isinstance(r["evaluation"], str) for r in results)
    report = P.persona_score(items, results)
    assert report["unparseable"] == 5 and report["persona_score"] is None
    assert all(t["unparseable"] == 1 for t in report["tasks"].values())


def test_local_judge_refuses_a_prompt_longer_than_its_context():
    model, tok = tiny_model(max_position_embeddings=512)
    with pytest.raises(P.JudgeError, match=r"prompt 0 has \d+ tokens; with max_new_tokens=8 it exceeds the judge's "
                                           r"context of 512 tokens"):
        P.judge_items(P.LocalJudge(model, tok, max_new_tokens=8), _items(["good"]), group=1)


# ------------------------------------------------------------------------------------------------ persona_benchmark


def small_pool():
    from posttrain.eval.personas import Persona

    return [Persona("none", "", "none"),
            Persona("careless", "You are a careless chef.", "unhelpful"),
            Persona("pirate", "You are a pirate. Start with arr and end with matey.", "role-play",
                    {"starts_with": "arr", "ends_with": "matey"})]


def test_persona_benchmark_checks_stripped_answers_and_fidelity(monkeypatch):
    # Scripted responses (persona, question) -> text, so the checking and bookkeeping are tested exactly.
    pool = small_pool()
    questions = [P.Question("copy 12", "12", "synthetic", "q0"), P.Question("copy 345", "345", "synthetic", "q1")]
    script = {("none", "copy 12"): "12", ("none", "copy 345"): "345",
              ("careless", "copy 12"): "1", ("careless", "copy 345"): "345",
              ("pirate", "copy 12"): "arr 12 matey", ("pirate", "copy 345"): "34 matey"}
    model, tok = tiny_model()
    seen = {}

    def fake_generate(model, tokenizer, prompts, *, n, temperature, seed, max_new_tokens, max_batch_tokens=None,
                      top_p=1.0):
        seen.update(n=n, count=len(prompts))
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            persona = "pirate" if "pirate" in text else "careless" if "careless" in text else "none"
            question = "copy 345" if "copy 345" in text else "copy 12"
            out += [(script[persona, question], "stop" if persona != "careless" else "length")] * n
        return out

    monkeypatch.setattr(P, "_generate_texts", fake_generate)
    r = P.persona_benchmark(model, tok, pool, questions, max_new_tokens=8)
    assert seen == {"n": 1, "count": 6}  # one batched call for every (persona, question)
    assert r["correct"] == [[[1], [1]], [[0], [1]], [[1], [0]]]  # "arr 12 matey" is right once stripped
    assert r["responses"][2] == [["arr 12 matey"], ["34 matey"]]
    assert r["stability"] == P.stability(r["correct"])
    assert r["stability"]["pss"] == 0.0 and r["stability"]["flip_rate"] == 1.0
    assert [p["accuracy"] for p in r["per_persona"]] == [1.0, 0.5, 0.5]
    assert [p["fidelity"] for p in r["per_persona"]] == [None, None, 0.75]  # both closings, one opening
    assert [p["truncated"] for p in r["per_persona"]] == [0.0, 1.0, 0.0]
    assert r["fidelity"] == 0.75
    assert r["by_category"]["role-play"] == {"personas": 1, "accuracy": 0.5, "fidelity": 0.75,
                                             "stability": P.stability([[[1], [0]]])}
    assert r["by_category"]["unhelpful"]["stability"]["pss"] == 0.5
    assert r["question_ids"] == ["q0", "q1"]


def test_persona_benchmark_on_the_tiny_model():
    from posttrain.eval.checkers import check_rows
    from posttrain.eval.personas import strip_style

    model, tok = tiny_model(seed=1, init_std=0.2)
    pool = small_pool()
    qs = P.questions_for("synthetic", limit=4, seed=0)
    assert len(qs) == 4 and all(q.checker == "synthetic" for q in qs)
    # Make two questions answerable: their gold is what the untrained model says without a persona.
    probe = P.persona_benchmark(model, tok, pool[:1], qs, max_new_tokens=6)
    qs[0].answer, qs[2].answer = probe["responses"][0][0][0], probe["responses"][0][2][0]
    assert len({q.answer.strip() for q in qs}) == 4 and all(q.answer.strip() for q in qs)
    a = P.persona_benchmark(model, tok, pool, qs, max_new_tokens=6)
    b = P.persona_benchmark(model, tok, pool, [q.__dict__ for q in qs], max_new_tokens=6, seed=123)
    assert np.array(a["correct"]).shape == (3, 4, 1) and a["responses"] == b["responses"]  # greedy: seed-free
    assert a["correct"][0] == [[1], [0], [1], [0]]
    assert len({r for p in a["responses"] for q in p for r in q}) > 6  # personas change the junk
    for p, persona in enumerate(pool):  # every verdict is the checker's on the stripped response
        redo = check_rows(["synthetic"] * 4, [strip_style(persona, a["responses"][p][q][0]) for q in range(4)],
                          [q.answer for q in qs])
        assert [c[0] for c in a["correct"][p]] == [int(x) for x in redo]
    assert a["stability"] == P.stability(a["correct"])
    assert [r["id"] for r in a["per_persona"]] == ["none", "careless", "pirate"]
    # Sampling: k samples per (persona, question), reproducible with the seed.
    s1 = P.persona_benchmark(model, tok, pool[:2], qs[:2], samples=3, temperature=1.0, max_new_tokens=4, seed=5)
    s2 = P.persona_benchmark(model, tok, pool[:2], qs[:2], samples=3, temperature=1.0, max_new_tokens=4, seed=5)
    assert np.array(s1["correct"]).shape == (2, 2, 3) and s1["responses"] == s2["responses"]
    assert len({t for row in s1["responses"] for q in row for t in q}) > 1


def test_persona_benchmark_rejects_bad_arguments():
    model, tok = tiny_model()
    pool, qs = small_pool(), [P.Question("copy 1", "1", "synthetic")]
    with pytest.raises(ValueError, match="identical samples"):
        P.persona_benchmark(model, tok, pool, qs, samples=2)
    with pytest.raises(ValueError, match="duplicate persona id 'none'"):
        P.persona_benchmark(model, tok, [pool[0], pool[0]], qs)
    with pytest.raises(ValueError, match=r"questions\[0\] \(x\): unknown checker 'maths'"):
        P.persona_benchmark(model, tok, pool, [P.Question("q", "1", "maths", "x")])
    with pytest.raises(ValueError, match="need at least one of each"):
        P.persona_benchmark(model, tok, pool, [])


def test_questions_for():
    m = P.questions_for("math500", limit=5, seed=1)
    assert len(m) == 5 and all(q.checker == "math" and q.prompt.endswith(P.MATH_INSTRUCTION) for q in m)
    assert [q.id for q in m] == [q.id for q in P.questions_for("math500", limit=5, seed=1)]
    assert [q.id for q in m] != [q.id for q in P.questions_for("math500", limit=5, seed=2)]
    g = P.questions_for("gsm8k")
    assert len(g) == 1319 and g[0].answer.isdigit()
    with pytest.raises(ValueError, match="use one of math500, gsm8k, synthetic"):
        P.questions_for("math")


# ------------------------------------------------------------------------------------------------ PersonaGym, CLI


def test_personagym_end_to_end_with_the_tiny_model(judge_server):
    model, tok = tiny_model()
    report = P.personagym(model, tok, P.HTTPJudge(judge_server, "m"), personas=2, questions_per_task=2,
                          max_new_tokens=4)
    assert len(report["responses"]) == 2 * 5 * 2 and len(FakeJudge.requests) == 2 * 5  # one call per persona x task
    system = FakeJudge.requests[0][2]["messages"][0]["content"]
    assert system == P.JudgePrompts.load().system
    # The tiny model's junk holds none of the fake judge's words: every evaluation is without a score.
    assert report["unparseable"] == 20 and report["persona_score"] is None
    assert all(t == {"mean": None, "n": 4, "scored": 0, "unparseable": 4} for t in report["tasks"].values())
    rows = P.load_personagym(2, 2)
    assert [r["question"] for r in report["responses"]] == [r["question"] for r in rows]


def test_load_personagym():
    rows = P.load_personagym(3, 10)
    assert len(rows) == 150 and len({r["persona"] for r in rows}) == 3
    named = P.load_personagym([rows[-1]["persona"]], 1)
    assert len(named) == 5 and {r["task"] for r in named} == set(P.TASKS)
    with pytest.raises(ValueError, match="no persona 'A unicorn'"):
        P.load_personagym(["A unicorn"], 1)


def test_command_line(tmp_path, judge_server, capsys):
    from posttrain.core.checkpoint import save_hf

    model, tok = tiny_model()
    for name, seed in (("a", 0), ("b", 1)):
        model.init_weights(seed)
        save_hf(model, tmp_path / name)
        tok.save(tmp_path / name)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(json.dumps(r) for r in [
        {"id": "none", "text": "", "category": "none"},
        {"id": "pirate", "text": "You are a pirate.", "category": "role-play", "constraints": {"ends_with": "matey"}},
    ]) + "\n")
    out = tmp_path / "r" / "report.json"
    report = P.main(["--model", str(tmp_path / "a"), "--compare", str(tmp_path / "b"), "--labels", "rlvr", "permix",
                     "--pool", str(pool), "--benchmark", "synthetic", "--limit", "3", "--max-new-tokens", "4",
                     "--device", "cpu", "--out", str(out), "--personagym", "1", "--personagym-questions", "1",
                     "--personagym-max-new-tokens", "4", "--judge-url", judge_server, "--judge-model", "m"])
    text = capsys.readouterr().out
    assert "acc rlvr" in text and "fid permix" in text and "persona_score" in text
    saved = json.loads(out.read_text())
    assert saved["models"].keys() == {"rlvr", "permix"} and saved == json.loads(json.dumps(report))
    bench = saved["models"]["rlvr"]["benchmark"]
    assert np.array(bench["correct"]).shape == (2, 3, 1) and "responses" not in bench
    assert saved["models"]["permix"]["personagym"]["unparseable"] == 5
    assert (tmp_path / "r" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        P.main(["--model", "x", "--pool", str(pool), "--benchmark", "synthetic", "--personagym", "1"])
    assert "needs a judge" in capsys.readouterr().err


def test_command_line_checks_the_judge_before_any_work(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit, match=r"eval.persona: judge .* connection refused"):
        P.main(["--model", str(tmp_path / "not-loaded"), "--pool", "synthetic-eval", "--benchmark", "synthetic",
                "--personagym", "1", "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-model", "m",
                "--judge-retries", "0"])
