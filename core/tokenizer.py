"""Tokenizer and chat template: a thin wrapper over a Hugging Face `tokenizers.Tokenizer` loaded from `tokenizer.json`.

What it is for: encode/decode, the special ids a trainer and a sampler need (BOS, EOS, pad, stop ids), rendering a
conversation with the checkpoint's jinja2 chat template exactly as transformers renders it, the assistant-token mask
SFT trains on, and training the small byte-level BPE tokenizer that ships with the embedded tiny model.

What it is not: a tokenizer implementation (the Rust `tokenizers` library does the work), a loader for
sentencepiece-only checkpoints (`tokenizer.model` without `tokenizer.json`), or a port of every transformers
tokenizer option. It reads the same files transformers reads and produces the same ids and strings for them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _Backend

# ChatML, the format Qwen uses: every turn is `<|im_start|>role\n...<|im_end|>\n`. No default system prompt, so
# the rendering of a conversation is exactly its turns (and every prefix of it renders as a prefix of the string).
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# The named special tokens transformers puts into the chat template's context (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Pre-tokenization split for trained tokenizers: letters with an optional leading non-letter (so " the" is one
# piece), single digits (so numbers tokenize digit by digit, which arithmetic needs), punctuation runs, newlines and
# other whitespace. The byte-level step after it maps every byte to a symbol, so any unicode text round-trips.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Names under which a message's reasoning arrives. transformers copies it to `reasoning_content` and `thinking`,
# the two names templates read, so we do too (renders stay identical for reasoning templates).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A chat template failed to compile or to render, or is not usable for what was asked of it."""


# ----------------------------------------------------------------------------------------------------------------
# Chat template environment (the same jinja2 setup transformers uses, so renders match byte for byte)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text in some templates; we render just the body.

    The assistant mask comes from prefix rendering instead (see `Tokenizer.render_with_assistant_mask`), which works
    for every prefix-stable template, not only the few that carry this tag.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so a template cannot shadow the object's private state."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat template: namespace attribute {name!r} starts with '_'")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes `<`, `>`, `&` and `'`; chat templates want the plain JSON text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in a sandbox (templates from the Hub are untrusted code). Raises jinja2 errors."""
    if tuple(int(re.match(r"\d*", p).group() or 0) for p in jinja2.__version__.split(".")[:3]) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6 (older sandboxes have known escapes); found "
                          f"{jinja2.__version__}: pip install -U 'jinja2>=3.1.6'")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


def _normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """Copy messages the way transformers does before rendering: drop keys whose value is None, alias reasoning."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{i}]: expected a dict like {{'role': 'user', 'content': '...'}}, "
                            f"got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reading the files of a tokenizer directory


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when the file does not exist."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}; fix or delete the "
                         f"file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _token_content(value: Any, where: str) -> str | None:
    """A special token as written in tokenizer_config.json: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a token string, {{\"content\": \"...\"}} or null, got {value!r}")


def _pick_chat_template(value: Any, where: str) -> str | None:
    """`chat_template` is a string, or (older format) a list of {"name", "template"} of which we take "default"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for item in value:
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)):
                raise ValueError(f"{where}: each entry must be {{\"name\": str, \"template\": str}}, got {item!r}")
            named[item["name"]] = item["template"]
        if "default" not in named:
            raise ValueError(f"{where}: no template named 'default' among {sorted(named)}; rename the one to use")
        return named["default"]
    raise ValueError(f"{where}: expected a string or a list of named templates, got {type(value).__name__}")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and the chat template of its checkpoint.

    Build one with `Tokenizer.from_dir(path)` (a checkpoint or tokenizer directory) or `train_bpe_tokenizer(...)`.
    """

    def __init__(self, backend: _Backend, *, special_tokens: dict[str, str | None] | None = None,
                 chat_template: str | None = None, generation_config: dict | None = None,
                 config: dict | None = None, add_bos_token: bool = False, source: str = "<in memory>",
                 chat_template_source: str | None = None) -> None:
        """`special_tokens` maps SPECIAL_TOKEN_KEYS to token strings; `config` holds the remaining
        tokenizer_config.json keys (written back by `save`); `add_bos_token` only applies when tokenizer.json has no
        post-processor (otherwise the post-processor decides, as in transformers 5). `source` and
        `chat_template_source` say where things came from, for error messages."""
        self.backend = backend
        self.source = source
        self.chat_template_source = chat_template_source or f"{source}: chat_template"
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self.generation_config = generation_config
        self.config = dict(config or {})
        self._prepend_bos = add_bos_token and backend.post_processor is None

        added = backend.get_added_tokens_decoder()
        self.vocab_size: int = max(backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
        self.special_ids: frozenset[int] = frozenset(i for i, tok in added.items() if tok.special)

        ids = {key: self._special_id(key, tok) for key, tok in self.special_tokens.items()}
        self.bos_id: int | None = ids.get("bos_token")
        self.eos_id: int | None = ids.get("eos_token")
        self.pad_id: int | None = ids.get("pad_token")
        self.stop_ids: tuple[int, ...] = self._stop_ids()
        if self._prepend_bos and self.bos_id is None:
            raise ValueError(f"{source}: add_bos_token is true but there is no bos_token; set bos_token in "
                             f"tokenizer_config.json or set add_bos_token to false")
        if chat_template is not None:
            self._compile(chat_template)  # a template that does not compile fails at load, not at the first render

    def fingerprint(self) -> str:
        """A digest of everything that decides how a conversation renders to ids (vocabulary, merges, normaliser,
        special tokens, chat template, BOS rule): caches of tokenized data are keyed by it."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        for part in (self.backend.to_str(), self.chat_template or "", json.dumps(self.special_tokens, sort_keys=True),
                     str(self._prepend_bos)):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    # -- loading and saving ---------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load tokenizer.json and, when present, tokenizer_config.json, special_tokens_map.json,
        generation_config.json and chat_template.jinja (which, as in transformers, wins over the config's
        `chat_template`)."""
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: tokenizer directory does not exist (expected a directory holding "
                                    f"tokenizer.json, e.g. a Hugging Face checkpoint)")
        tok_file = root / "tokenizer.json"
        if not tok_file.exists():
            hint = (" It has a sentencepiece tokenizer.model only: convert it once with transformers, "
                    "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)." if (root / "tokenizer.model").exists()
                    else " Save one with tokenizers' Tokenizer.save or transformers' save_pretrained.")
            raise FileNotFoundError(f"{tok_file}: missing; the tokenizer needs tokenizer.json.{hint}")
        try:
            backend = _Backend.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises plain Exception with a serde message
            raise ValueError(f"{tok_file}: cannot be read by tokenizers: {e}") from None

        config = _read_json(root / "tokenizer_config.json") or {}
        config_name = "tokenizer_config.json"
        special_map = _read_json(root / "special_tokens_map.json") or {}
        generation_config = _read_json(root / "generation_config.json")

        special_tokens = {}
        for key in SPECIAL_TOKEN_KEYS:
            # tokenizer_config.json wins; special_tokens_map.json fills what it does not name.
            if key in config:
                special_tokens[key] = _token_content(config[key], f"{root / config_name}: key '{key}'")
            elif key in special_map:
                special_tokens[key] = _token_content(special_map[key], f"{root / 'special_tokens_map.json'}: "
                                                                       f"key '{key}'")

        template_file = root / "chat_template.jinja"
        if template_file.exists():
            chat_template, template_where = template_file.read_text(encoding="utf-8"), str(template_file)
        else:
            template_where = f"{root / config_name}: key 'chat_template'"
            chat_template = _pick_chat_template(config.get("chat_template"), template_where)
        add_bos = config.get("add_bos_token", False)
        if not isinstance(add_bos, bool):
            raise ValueError(f"{root / config_name}: key 'add_bos_token' must be true or false, got {add_bos!r}")

        rest = {k: v for k, v in config.items() if k not in SPECIAL_TOKEN_KEYS and k != "chat_template"}
        return cls(backend, special_tokens=special_tokens, chat_template=chat_template,
                   generation_config=generation_config, config=rest, add_bos_token=add_bos, source=str(root),
                   chat_template_source=template_where)

    def save(self, path: str | os.PathLike) -> None:
        """Write a directory that both `Tokenizer.from_dir` and transformers' `AutoTokenizer.from_pretrained` load:
        tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json, and
        generation_config.json when this tokenizer came with one or has an EOS (the stop ids live there)."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(root / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **self.config}
        config.update({key: self.special_tokens.get(key) for key in ("bos_token", "eos_token", "pad_token")})
        config.update(self.special_tokens)
        if self._prepend_bos:
            config["add_bos_token"] = True
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
            if (root / "chat_template.jinja").exists():
                # It would win over the config's template in transformers; keep the two the same.
                (root / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        _write_json(root / "tokenizer_config.json", config)
        _write_json(root / "special_tokens_map.json", dict(self.special_tokens))
        generation_config = self.generation_config
        if generation_config is None and self.eos_id is not None:
            generation_config = {"bos_token_id": self.bos_id, "eos_token_id": list(self.stop_ids),
                                 "pad_token_id": self.pad_id}
        if generation_config is not None:
            _write_json(root / "generation_config.json", generation_config)

    # -- ids ------------------------------------------------------------------------------------------------------

    def _special_id(self, key: str, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.source}: {key} {token!r} (tokenizer_config.json) is not in tokenizer.json's "
                             f"vocabulary; fix the token string or add it to tokenizer.json's added_tokens")
        return token_id

    def _stop_ids(self) -> tuple[int, ...]:
        """EOS first, then generation_config.json's eos_token_id (an int or a list), without repeats."""
        listed = (self.generation_config or {}).get("eos_token_id")
        if listed is None:
            listed = []
        elif isinstance(listed, int) and not isinstance(listed, bool):
            listed = [listed]
        if not (isinstance(listed, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in listed)):
            raise ValueError(f"{self.source}/generation_config.json: key 'eos_token_id' must be an int or a list "
                             f"of ints, got {listed!r}")
        for i in listed:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"{self.source}/generation_config.json: eos_token_id {i} is outside the "
                                 f"vocabulary [0, {self.vocab_size})")
        ordered = ([self.eos_id] if self.eos_id is not None else []) + listed
        return tuple(dict.fromkeys(ordered))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def __len__(self) -> int:
        return self.vocab_size

    # -- encode / decode ------------------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in `text` become their ids (as in transformers).
        add_special_tokens=True adds what the checkpoint adds around a document (BOS for Llama, nothing for Qwen)."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids.insert(0, self.bos_id)
        return ids

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` over a list, parallel in the Rust library."""
        out = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        if add_special_tokens and self._prepend_bos:
            for ids in out:
                ids.insert(0, self.bos_id)
        return out

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        # transformers 5 skips clean_up_tokenization_spaces for BPE models (every LLM here), so plain decode matches.
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat template --------------------------------------------------------------------------------------------

    def _compile(self, template: str) -> jinja2.Template:
        try:
            return compile_chat_template(template)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{self.chat_template_source}: the chat template does not compile: "
                                    f"line {e.lineno}: {e.message}") from None

    def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                    **template_kwargs: Any) -> str:
        """The chat template's string for `messages`, the same as transformers'
        `apply_chat_template(messages, tokenize=False, ...)`. Extra keyword arguments (tools, documents,
        enable_thinking, ...) reach the template as variables and override the special-token variables."""
        if self.chat_template is None:
            raise ChatTemplateError(f"{self.source}: this tokenizer has no chat template; add 'chat_template' to "
                                    f"tokenizer_config.json (or a chat_template.jinja file), or set "
                                    f"tokenizer.chat_template")
        template = self._compile(self.chat_template)
        context = {"tools": None, "documents": None, **self.special_tokens, **template_kwargs}
        try:
            return template.render(messages=_normalize_messages(messages), add_generation_prompt=add_generation_prompt,
                                   **context)
        except jinja2.TemplateError as e:
            # raise_exception(...) in the template lands here with the template's own message.
            raise ChatTemplateError(f"{self.chat_template_source}: the chat template raised "
                                    f"{type(e).__name__}: {e.message}") from None

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                            tokenize: bool = False, **template_kwargs: Any) -> str | list[int]:
        """Render `messages` with the chat template; with tokenize=True return its ids. The rendered string already
        holds every special token the format needs (BOS included), so it is encoded without adding any."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def render_with_assistant_mask(self, messages: Sequence[dict], **template_kwargs: Any
                                   ) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation and a 0/1 mask that is 1 on the tokens an assistant turn generates:
        its content and its end-of-turn token (the last stop id in the turn), not the header before it nor the
        newline a template writes after it.

        How: render each prefix `messages[:i+1]`, and before each assistant turn `messages[:i]` with the generation
        prompt; each rendering must extend the previous one as a string (else ChatTemplateError: the template
        rewrites earlier turns, e.g. drops old reasoning). The text between consecutive renderings is tokenized on
        its own, so the prompt ends on a token boundary exactly where generation starts at inference time.
        """
        messages = list(messages)
        ids: list[int] = []
        mask: list[int] = []
        done = ""  # rendering of the messages handled so far

        def extend(text: str, what: str) -> str:
            if not text.startswith(done):
                raise ChatTemplateError(
                    f"{self.chat_template_source}: the template is not prefix-stable: rendering {what} does not "
                    f"start with the rendering of the messages before it, so assistant tokens cannot be located "
                    f"by prefix "
                    f"(first difference at character {_first_difference(done, text)}); use a template whose "
                    f"earlier turns render the same whatever follows them")
            return text[len(done):]

        for i, message in enumerate(messages):
            if message.get("role") == "assistant":
                prompt = self.render_chat(messages[:i], add_generation_prompt=True, **template_kwargs)
                piece = extend(prompt, f"messages[:{i}] with add_generation_prompt=True")
                ids += self.encode(piece)
                mask += [0] * (len(ids) - len(mask))
                done = prompt
                full = self.render_chat(messages[:i + 1], **template_kwargs)
                turn = self.encode(extend(full, f"messages[:{i + 1}]"))
                last_stop = max((j for j, t in enumerate(turn) if t in self.stop_ids), default=len(turn) - 1)
                ids += turn
                mask += [1] * (last_stop + 1) + [0] * (len(turn) - last_stop - 1)
            else:
                full = self.render_chat(messages[:i + 1], **template_kwargs)
                ids += self.encode(extend(full, f"messages[:{i + 1}]"))
                mask += [0] * (len(ids) - len(mask))
            done = full
        return ids, mask


def _first_difference(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Training the embedded tokenizer


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int,
                        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
                        eos_token: str = "<|endoftext|>", pad_token: str | None = "<|endoftext|>",
                        bos_token: str | None = None, stop_tokens: Sequence[str] = ("<|im_end|>",),
                        chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
                        out_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts` (any unicode round-trips: all 256 bytes are in the alphabet).

    Special tokens take ids 0..len(special_tokens)-1, in order. `bos_token`, when given, is added in front of each
    document by `encode(..., add_special_tokens=True)` (Llama style); without it nothing is added (Qwen style).
    `stop_tokens` join EOS in `stop_ids` (and in generation_config.json's eos_token_id once saved). Writes the
    tokenizer directory to `out_dir` when given. A few thousand short strings train in well under a second.
    """
    special_tokens = list(special_tokens)
    for name, token in [("eos_token", eos_token), ("pad_token", pad_token), ("bos_token", bos_token),
                        *(("stop_tokens", t) for t in stop_tokens)]:
        if token is not None and token not in special_tokens:
            raise ValueError(f"train_bpe_tokenizer: {name} {token!r} is not in special_tokens {special_tokens}; "
                             f"add it there")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(special_tokens) + len(alphabet):
        raise ValueError(f"train_bpe_tokenizer: vocab_size={vocab_size} cannot hold the {len(special_tokens)} "
                         f"special tokens and the {len(alphabet)} byte symbols; use at least "
                         f"{len(special_tokens) + len(alphabet)}")

    backend = _Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[AddedToken(t, special=True, normalized=False)
                                                                         for t in special_tokens],
                                  initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    if bos_token is not None:
        bos_id = backend.token_to_id(bos_token)
        backend.post_processor = processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A $B",
                                                               special_tokens=[(bos_token, bos_id)])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)

    generation_config = {"bos_token_id": None if bos_token is None else backend.token_to_id(bos_token),
                         "eos_token_id": [backend.token_to_id(t) for t in dict.fromkeys([eos_token, *stop_tokens])],
                         "pad_token_id": None if pad_token is None else backend.token_to_id(pad_token)}
    tok = Tokenizer(backend, special_tokens={"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token},
                    chat_template=chat_template, generation_config=generation_config,
                    source="train_bpe_tokenizer")
    if out_dir is not None:
        tok.save(out_dir)
    return tok
