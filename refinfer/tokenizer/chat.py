"""Chat templates: render tokenizer.chat_template (Jinja2) the way Hugging Face transformers does.

transformers' apply_chat_template compiles the template in an ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks on and the loopcontrols extension, and gives the template
raise_exception(), strftime_now() and a tojson filter that keeps non-ASCII text as is. The
variables are messages, add_generation_prompt, bos_token, eos_token and any extra keyword
(tools, documents, ...). The result is text; encode it with parse_special=True so the markers
become their special tokens.
"""

from __future__ import annotations

import datetime
import json

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import FormatError, RefinferError

TEMPLATE_KEY = "tokenizer.chat_template"


class TemplateRaised(RefinferError):
    """The template itself called raise_exception(), e.g. for a role order it does not accept."""


def _raise_exception(message):
    raise TemplateRaised(f"chat template raised: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        if not isinstance(source, str):
            raise FormatError(f"metadata key {TEMPLATE_KEY!r} is {type(source).__name__}, expected a string")
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise FormatError(f"metadata key {TEMPLATE_KEY!r}: Jinja syntax error on template line {e.lineno}: "
                              f"{e.message}") from None

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, tokenizer=None, name: str | None = None) -> "ChatTemplate":
        """bos_token/eos_token are the texts of the tokenizer's BOS/EOS tokens, when given; name
        picks a named template (tokenizer.chat_template.<name>, e.g. "tool_use")."""
        key = TEMPLATE_KEY if name is None else f"{TEMPLATE_KEY}.{name}"
        if key not in metadata:
            named = sorted(k[len(TEMPLATE_KEY) + 1:] for k in metadata if k.startswith(TEMPLATE_KEY + "."))
            raise RefinferError(f"metadata key {key!r} is missing: this model has no such chat template",
                                hint=(f"named templates here: {', '.join(named)}" if named else
                                      "pass a template explicitly, or prompt the model with plain text"))
        bos = eos = ""
        if tokenizer is not None:
            bos = tokenizer.tokens[tokenizer.bos_id] if tokenizer.bos_id is not None else ""
            eos = tokenizer.tokens[tokenizer.eos_id] if tokenizer.eos_id is not None else ""
        return cls(metadata[key], bos, eos)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, **variables,
                   "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(**context)
        except TemplateRaised:
            raise
        except jinja2.TemplateError as e:
            raise RefinferError(f"chat template failed: {type(e).__name__}: {e}") from None


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = False,
                bos_token: str = "", eos_token: str = "", **variables) -> str:
    return ChatTemplate(template, bos_token, eos_token).render(messages, add_generation_prompt, **variables)
