"""core/tokenizer.py against transformers: same chat-template strings, same ids, same special ids, clear errors."""

import json
import random
import shutil

import pytest

from posttrain.core.tokenizer import (DEFAULT_CHAT_TEMPLATE, ChatTemplateError, Tokenizer, compile_chat_template,
                            train_bpe_tokenizer)

transformers = pytest.importorskip("transformers")

# The chat template of Qwen2.5-Instruct's tokenizer_config.json (Apache-2.0, Qwen team), as published on the Hub:
# default system prompt when the conversation has none, tool schemas through tojson.
QWEN25_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# A Llama-3-style template written for this test: BOS from the context, optional system header, trimmed contents,
# roles that must alternate user/assistant (raise_exception otherwise).
LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = '' %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- if system_message %}\n"
    "    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}\n"
    "{%- endif %}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# Exercises the rest of the environment: namespace, loop controls, tojson with indent, {% generation %}, kwargs.
FEATURE_TEMPLATE = (
    "{%- set ns = namespace(n=0) %}\n"
    "{%- for m in messages %}\n"
    "    {%- if m.role == 'system' %}{% continue %}{% endif %}\n"
    "    {%- set ns.n = ns.n + 1 %}\n"
    "    {% if m.name is defined %}\n"
    "(name={{ m.name }})\n"
    "    {% endif %}\n"
    "    {%- if m.role == 'assistant' %}\n"
    "{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}\n"
    "    {%- else %}\n"
    "[{{ ns.n }}] {{ m | tojson(indent=2) }} {{ m.content | tojson }}\n"
    "    {%- endif %}\n"
    "    {%- if ns.n >= 3 %}{% break %}{% endif %}\n"
    "{%- endfor %}\n"
    "{{ bos_token | default('no-bos') }}|{{ pad_token }}|{{ custom | default('') }}\n"
)

CONVERSATIONS = {
    "system_two_turns": [
        {"role": "system", "content": "You are a terse math tutor."},
        {"role": "user", "content": "What is 12 * 7?"},
        {"role": "assistant", "content": "12 * 7 = 84."},
        {"role": "user", "content": "And 84 / 4?"},
        {"role": "assistant", "content": "21. Übung macht den Meister 😀"},
    ],
    "no_system_ends_with_user": [
        {"role": "user", "content": "Name a prime larger than 10."},
        {"role": "assistant", "content": "11"},
        {"role": "user", "content": "  Another one, please.\n"},
    ],
    "single_user": [{"role": "user", "content": "你好，世界"}],
}


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Short pseudo-sentences: random syllable words, digits, punctuation, some non-ASCII."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "an", "the", "er", "mo", "su", "li", "ne", "ö", "é", "ß", "数", "学"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(2, 12))) + f" {rng.randint(0, 999)}."
            + rng.choice(["", "\n", "?", "!\n\n"]) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, corpus):
    # Qwen2.5-Instruct's special-token layout: no BOS, eos <|im_end|>, pad <|endoftext|>, both stop generation.
    d = tmp_path_factory.mktemp("qwen")
    train_bpe_tokenizer(corpus, vocab_size=700, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                        eos_token="<|im_end|>", pad_token="<|endoftext|>", stop_tokens=("<|endoftext|>",),
                        chat_template=QWEN25_TEMPLATE, out_dir=d)
    return d


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, corpus):
    # Llama-3-Instruct's layout: BOS added to documents, eos <|eot_id|>, <|end_of_text|> also stops, no pad.
    d = tmp_path_factory.mktemp("llama")
    train_bpe_tokenizer(corpus, vocab_size=700,
                        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                        "<|end_header_id|>", "<|eot_id|>"),
                        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=None,
                        stop_tokens=("<|end_of_text|>",), chat_template=LLAMA3_TEMPLATE, out_dir=d)
    return d


def _hf(path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _hf_chat_ids(hf, messages, **kwargs):
    out = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ---- chat template: same string and ids as transformers -------------------------------------------------------


@pytest.mark.parametrize("template_dir", ["qwen_dir", "llama_dir"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(request, template_dir, conversation, add_generation_prompt):
    path = request.getfixturevalue(template_dir)
    ours, hf = Tokenizer.from_dir(path), _hf(path)
    messages = CONVERSATIONS[conversation]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == want
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == _hf_chat_ids(hf, messages, add_generation_prompt=add_generation_prompt)
    assert ours.decode(ids) == want


def test_qwen_default_system_prompt_and_generation_prompt(qwen_dir):
    tok = Tokenizer.from_dir(qwen_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                    "assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_llama_template_starts_with_bos_once(llama_dir):
    tok = Tokenizer.from_dir(llama_dir)
    ids = tok.apply_chat_template(CONVERSATIONS["system_two_turns"], tokenize=True)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


def test_qwen_tools_path_matches_transformers(qwen_dir):
    ours, hf = Tokenizer.from_dir(qwen_dir), _hf(qwen_dir)
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Schlägt nach: <b>&'",
                                               "parameters": {"type": "object", "properties": {"q": {"type": "string"}},
                                                              "required": ["q"]}}}]
    messages = [{"role": "user", "content": "look up π"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": {"q": "π"}}}]},
                {"role": "tool", "content": "3.14159"}]
    want = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    got = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    assert got == want
    assert '"description": "Schlägt nach: <b>&\'"' in got  # tojson neither escapes non-ASCII nor HTML


def test_feature_template_matches_transformers(qwen_dir, tmp_path):
    shutil.copytree(qwen_dir, tmp_path / "t")
    cfg_path = tmp_path / "t" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = FEATURE_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    ours, hf = Tokenizer.from_dir(tmp_path / "t"), _hf(tmp_path / "t")
    # A None value is dropped before rendering (so `is defined` is false), as transformers 5.24 does (5.17 and 5.20
    # render it, "(name=None)"): compared with transformers on the messages without it, whatever its version.
    messages = [{**m, "name": None if i != 3 else "bob"} for i, m in enumerate(CONVERSATIONS["system_two_turns"])]
    dropped = [{k: v for k, v in m.items() if v is not None} for m in messages]
    for kwargs in [{}, {"custom": "X"}, {"pad_token": "override"}]:
        want = hf.apply_chat_template(dropped, tokenize=False, **kwargs)
        assert ours.apply_chat_template(messages, **kwargs) == ours.apply_chat_template(dropped, **kwargs) == want
    assert "[1] {\n  \"role\": \"user\"" in want and "no-bos|override|" in want
    assert want.count("(name=") == 1 and "<|im_end|>(name=bob)\n[3]" in want


# ---- assistant mask ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template_dir,end_token", [("qwen_dir", "<|im_end|>"), ("llama_dir", "<|eot_id|>")])
def test_assistant_mask_marks_content_and_end_token_only(request, template_dir, end_token):
    tok = Tokenizer.from_dir(request.getfixturevalue(template_dir))
    messages = CONVERSATIONS["system_two_turns"]
    ids, mask = tok.render_with_assistant_mask(messages)
    assert len(ids) == len(mask)
    # The segment-wise ids are the ids of the full rendering (these templates end segments on token boundaries).
    assert ids == tok.apply_chat_template(messages, tokenize=True)
    runs, run = [], []
    for token, m in zip(ids, mask):
        if m:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [c + end_token for c in contents]
    assert sum(mask) == sum(len(tok.encode(c)) + 1 for c in contents)


def test_assistant_mask_without_assistant_is_all_zero(qwen_dir):
    tok = Tokenizer.from_dir(qwen_dir)
    ids, mask = tok.render_with_assistant_mask(CONVERSATIONS["single_user"])
    assert ids == tok.apply_chat_template(CONVERSATIONS["single_user"], tokenize=True) and not any(mask)


def test_assistant_mask_rejects_template_that_is_not_prefix_stable(qwen_dir):
    tok = Tokenizer.from_dir(qwen_dir)
    # The header counts the messages, so a shorter conversation does not render as a prefix of a longer one.
    tok.chat_template = "{{ messages | length }} turns\n" + DEFAULT_CHAT_TEMPLATE
    with pytest.raises(ChatTemplateError, match="not prefix-stable"):
        tok.render_with_assistant_mask(CONVERSATIONS["system_two_turns"])


# ---- encode / decode / special ids ------------------------------------------------------------------------------


def _random_unicode(rng: random.Random, n: int) -> str:
    pools = [(0x20, 0x7E), (0xA0, 0x17F), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F), (0x0, 0x1F),
             (0x300, 0x36F), (0xE000, 0xE0FF), (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_trained_tokenizer_round_trips_unicode_and_matches_transformers(qwen_dir):
    ours, hf = Tokenizer.from_dir(qwen_dir), _hf(qwen_dir)
    rng = random.Random(1)
    texts = [_random_unicode(rng, rng.randint(0, 60)) for _ in range(200)]
    texts += ["", " ", "\r\n\t", "a<|im_end|>b", "ß數学 1234567890 !!!\n\n", "\x00\ufffd\ud7ff"]
    for text in texts:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        assert ids == hf.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=True) == hf.encode(text)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.encode_batch(texts) == [ours.encode(t) for t in texts]


def test_llama_layout_adds_bos_like_transformers(llama_dir):
    ours, hf = Tokenizer.from_dir(llama_dir), _hf(llama_dir)
    text = "kato rine 42."
    assert ours.encode(text, add_special_tokens=True) == hf.encode(text) == [ours.bos_id] + ours.encode(text)
    assert ours.encode_batch([text, ""], add_special_tokens=True) == [hf.encode(text), hf.encode("")]
    assert ours.decode(hf.encode(text), skip_special_tokens=True) == text


@pytest.mark.parametrize("template_dir", ["qwen_dir", "llama_dir"])
def test_special_ids_match_transformers(request, template_dir):
    path = request.getfixturevalue(template_dir)
    ours, hf = Tokenizer.from_dir(path), _hf(path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ours.vocab_size == len(hf) == 700
    gen = transformers.GenerationConfig.from_pretrained(str(path))
    want_stops = [gen.eos_token_id] if isinstance(gen.eos_token_id, int) else gen.eos_token_id
    assert set(ours.stop_ids) == {hf.eos_token_id, *want_stops} and ours.stop_ids[0] == ours.eos_id
    assert len(set(ours.stop_ids)) == len(ours.stop_ids)


def test_default_tokenizer_layout(corpus, tmp_path):
    tok = train_bpe_tokenizer(corpus, vocab_size=600, out_dir=tmp_path)
    eot, im_start, im_end = (tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    assert (eot, im_start, im_end) == (0, 1, 2)
    assert tok.bos_id is None and tok.eos_id == tok.pad_id == eot and tok.stop_ids == (eot, im_end)
    assert tok.vocab_size == 600
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    again = Tokenizer.from_dir(tmp_path)
    assert (again.stop_ids, again.chat_template, again.vocab_size) == (tok.stop_ids, DEFAULT_CHAT_TEMPLATE, 600)
    assert again.encode("ka to 12") == tok.encode("ka to 12")


# ---- reading transformers-style directories ---------------------------------------------------------------------


def test_reads_added_token_dicts_template_lists_and_side_files(qwen_dir, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(qwen_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "rstrip": False,
                        "normalized": False, "single_word": False, "special": True}
    cfg["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    del cfg["pad_token"]
    cfg["model_max_length"] = 32768
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "temperature": 0.7}))
    tok = Tokenizer.from_dir(d)
    assert tok.eos_id == tok.token_to_id("<|im_end|>")  # tokenizer_config.json wins over special_tokens_map.json
    assert tok.pad_id == tok.token_to_id("<|endoftext|>") == 0
    assert tok.stop_ids == (tok.eos_id, 0) and tok.chat_template == "plain"
    (d / "chat_template.jinja").write_text("from jinja file")
    assert Tokenizer.from_dir(d).chat_template == "from jinja file"

    out = tmp_path / "saved"
    tok.save(out)
    again = Tokenizer.from_dir(out)
    assert (again.eos_id, again.pad_id, again.stop_ids, again.chat_template) == (tok.eos_id, 0, tok.stop_ids, "plain")
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.7
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 32768
    assert _hf(out).eos_token_id == tok.eos_id


def test_add_bos_token_config_applies_when_tokenizer_json_has_no_post_processor(llama_dir, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(llama_dir, d)
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (d / "tokenizer.json").write_text(json.dumps(spec))
    plain = Tokenizer.from_dir(d)
    assert plain.encode("ka", add_special_tokens=True) == plain.encode("ka")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    tok = Tokenizer.from_dir(d)
    assert tok.encode("ka", add_special_tokens=True) == [tok.bos_id] + tok.encode("ka")
    assert tok.encode_batch(["ka"], add_special_tokens=True) == [[tok.bos_id] + tok.encode("ka")]


# ---- bad inputs: clear errors that name the file and key --------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **changes):
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(changes)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


def test_missing_directory_and_tokenizer_json(qwen_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")
    d = _copy(qwen_dir, tmp_path / "t")
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"t/tokenizer\.json: missing"):
        Tokenizer.from_dir(d)
    (d / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match="sentencepiece"):
        Tokenizer.from_dir(d)


def test_unreadable_tokenizer_json(qwen_dir, tmp_path):
    d = _copy(qwen_dir, tmp_path / "t")
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(ValueError, match=r"tokenizer\.json: cannot be read"):
        Tokenizer.from_dir(d)


def test_malformed_tokenizer_config(qwen_dir, tmp_path):
    d = _copy(qwen_dir, tmp_path / "t")
    (d / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>",\n "pad_token": }')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: invalid JSON at line 2 column"):
        Tokenizer.from_dir(d)
    (d / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: expected a JSON object"):
        Tokenizer.from_dir(d)


@pytest.mark.parametrize("changes,pattern", [
    ({"eos_token": "<|not_a_token|>"}, r"eos_token '<\|not_a_token\|>' .* not in tokenizer\.json's vocabulary"),
    ({"pad_token": 5}, r"tokenizer_config\.json: key 'pad_token': expected a token string"),
    ({"chat_template": 3}, r"tokenizer_config\.json: key 'chat_template': expected a string"),
    ({"chat_template": [{"name": "rag", "template": "x"}]}, r"key 'chat_template': no template named 'default'"),
    ({"chat_template": "{% for m in messages %}{{ m }"}, r"key 'chat_template': the chat template does not compile"),
    ({"add_bos_token": "yes"}, r"key 'add_bos_token' must be true or false"),
])
def test_bad_tokenizer_config_values(qwen_dir, tmp_path, changes, pattern):
    d = _copy(qwen_dir, tmp_path / "t")
    _edit_config(d, **changes)
    with pytest.raises(ValueError, match=pattern):
        Tokenizer.from_dir(d)


def test_bad_generation_config(qwen_dir, tmp_path):
    d = _copy(qwen_dir, tmp_path / "t")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(ValueError, match=r"generation_config\.json: key 'eos_token_id' must be an int"):
        Tokenizer.from_dir(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 10**6]}))
    with pytest.raises(ValueError, match=r"eos_token_id 1000000 is outside the vocabulary \[0, 700\)"):
        Tokenizer.from_dir(d)


def test_template_raise_exception_names_template_and_message(llama_dir):
    ours, hf = Tokenizer.from_dir(llama_dir), _hf(llama_dir)
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):  # transformers refuses it too
        hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json: key 'chat_template': the chat template "
                                                r"raised TemplateError: Conversation roles must alternate"):
        ours.apply_chat_template(messages)
    with pytest.raises(ChatTemplateError, match="must alternate"):
        ours.render_with_assistant_mask(messages)


def test_missing_chat_template_and_bad_messages(qwen_dir, tmp_path):
    d = _copy(qwen_dir, tmp_path / "t")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(d)
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="has no chat template; add 'chat_template' to tokenizer_config"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    with pytest.raises(TypeError, match=r"messages\[1\]: expected a dict"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, "hello"])


def test_template_sandbox_blocks_attribute_escapes():
    template = compile_chat_template("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        template.render(messages=[])
    with pytest.raises(Exception, match="starts with '_'"):
        compile_chat_template("{% set ns = namespace(a=1) %}{% set ns._x = 2 %}").render()


def test_train_rejects_inconsistent_arguments(corpus):
    with pytest.raises(ValueError, match=r"eos_token '<\|eos\|>' is not in special_tokens"):
        train_bpe_tokenizer(corpus[:10], vocab_size=600, eos_token="<|eos|>")
    with pytest.raises(ValueError, match="vocab_size=100 cannot hold"):
        train_bpe_tokenizer(corpus[:10], vocab_size=100)
