"""The OpenAI API's requests as pydantic models (vLLM's entrypoints/openai/protocol.py shape):
one model per request type, field names exactly as in the API, validation in the model.

Defaults for fields a request leaves out are OpenAI's, not llama.cpp's: temperature 1.0,
top_p 1.0, no top-k (0), no min-p (0.0), no repetition penalty (1.0); max_tokens 16 for
/v1/completions (the legacy API's default) and "the rest of the context" for chat. Extensions
as in vLLM and llama-server: top_k, min_p, repetition_penalty (alias repeat_penalty),
repeat_last_n, return_tokens_as_token_ids. A field the API does not have is a 400 naming it,
as OpenAI answers ("Unrecognized request argument"), so that a misspelt option never runs
silently with its default.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..generation import CHAT_ROLES, MAX_TOP_LOGPROBS

MAX_CHOICES = 64          # prompts x n in one request


class ApiError(Exception):
    """An error answered as the OpenAI error object {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers, self.extra = headers, extra

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False     # vLLM: usage on every chunk


class _Sampling(_Strict):
    """The fields /v1/completions and /v1/chat/completions share."""
    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)                     # vLLM: -1 or 0 = off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    repeat_penalty: float | None = Field(None, gt=0.0)          # llama-server's name
    repeat_last_n: int | None = Field(None, ge=-1)
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    seed: int | None = Field(None, ge=-1, lt=2 ** 64)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_tokens_as_token_ids: bool = False

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_openai_penalties(cls, v):
        if v:
            raise ValueError("is not supported (only 0); use repetition_penalty, as llama.cpp and vLLM do")
        return v

    @model_validator(mode="after")
    def _checks(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if self.repetition_penalty is not None and self.repeat_penalty is not None \
                and self.repetition_penalty != self.repeat_penalty:
            raise ValueError("repetition_penalty and repeat_penalty are the same setting; give one of them")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise ValueError("stop takes at most 16 strings")
        return self

    def sampling(self) -> dict:
        """Model.generate's keyword arguments for these fields (with OpenAI's defaults)."""
        pen = self.repetition_penalty if self.repetition_penalty is not None else self.repeat_penalty
        return dict(temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=1.0 if self.top_p is None else self.top_p,
                    top_k=0 if self.top_k in (None, -1) else self.top_k,
                    min_p=0.0 if self.min_p is None else self.min_p,
                    repeat_penalty=1.0 if pen is None else pen,
                    repeat_last_n=64 if self.repeat_last_n is None else self.repeat_last_n,
                    stop=[] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop))


PromptType = Union[str, list[int], list[str], list[list[int]]]


class CompletionRequest(_Sampling):
    prompt: PromptType
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict | None = None

    @model_validator(mode="after")
    def _legacy(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported (only best_of = n)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 is only allowed with echo: true (the prompt's logprobs alone)")
        return self

    def prompts(self) -> list:
        """The batch: each element a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")          # name, tool_call_id, ...: passed to the template
    role: str
    content: Union[str, list[ContentPart], None] = None

    @field_validator("role")
    @classmethod
    def _role(cls, v):
        if v not in CHAT_ROLES and v != "developer":
            raise ValueError(f"role must be one of {', '.join(CHAT_ROLES)} (or developer), got {v!r}")
        return v

    def for_template(self) -> dict:
        c = self.content
        text = "" if c is None else c if isinstance(c, str) else "".join(part.text for part in c)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    logit_bias: dict | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools are not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError("response_format is not supported (only {\"type\": \"text\"})")
        return self

    @property
    def max_new(self) -> int | None:
        """max_completion_tokens wins over the deprecated max_tokens (vLLM's rule)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt, or messages through the chat template. Special tokens in the
    text are parsed (lm-eval finds the BOS id by tokenizing the BOS string)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class LlamaCompletionRequest(BaseModel):
    """llama-server's native /completion (the seed documents' curl example). Its own defaults:
    n_predict -1 (to the end of the context), temperature 0.8, top_k 40, top_p 0.95, min_p 0.05."""
    model_config = ConfigDict(extra="forbid")
    prompt: Union[str, list[int]]
    n_predict: int = Field(-1, ge=-1)
    temperature: float = Field(0.8, ge=0.0)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0)
    repeat_last_n: int = Field(64, ge=-1)
    seed: int = Field(-1, ge=-1, lt=2 ** 64)
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    n_probs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    cache_prompt: bool = True
    return_tokens: bool = False
