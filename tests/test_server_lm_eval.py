"""lm-eval 0.4.13's `local-completions` model against the server, on a small local
multiple-choice task, with lm-eval's remote tokenizer (/tokenizer_info, /tokenize,
/detokenize): every log-likelihood it reports equals the one refinfer computes directly from
Model.logits, split at the context/continuation boundary as lm-eval's _encode_pair splits it.

lm-eval sends echo=true, max_tokens=1, logprobs=1 and sums token_logprobs[ctxlen:-1], dropping
the last entry as the generated token. The model here (tiny_chat_eog_gguf) often ends at once
with an end-of-generation token: the server must still list that token, or lm-eval would drop
the last continuation token instead (the test checks that some requests end that way)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import refinfer
from ci_skips import oracle_import
from refinfer.generation import log_softmax
from server_harness import serve_model

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Rome", "a small green frog"], "answer": 0},
    {"question": "Hello", "choices": ["world", "there, friend", "!"], "answer": 1},
    {"question": "Two plus two equals ", "choices": ["four", "five"], "answer": 0},
    {"question": "What is the colour of the sky?\nAnswer:", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "The cat", "choices": ["sat on the mat", "flew", "is a dog"], "answer": 2},
]

TASK = """task: refinfer_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def encode_pair(model, context, continuation):
    """lm-eval's TemplateLM._encode_pair (api models: no special tokens)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = model.tokenize(context + continuation, add_special=False)
    ctx = model.tokenize(context, add_special=False)
    return ctx, whole[len(ctx):]


def direct_loglikelihood(model, context, continuation) -> tuple[float, bool, bool]:
    """(sum of the continuation's log-probs, whether each was the argmax, whether the token after
    the whole sequence is an end-of-generation token under greedy decoding)."""
    ctx, cont = encode_pair(model, context, continuation)
    seq = ctx + cont
    rows = model.logits(seq)                                  # row i predicts token i + 1
    lps = [float(log_softmax(rows[j - 1])[seq[j]]) for j in range(len(ctx), len(seq))]
    greedy = all(int(np.argmax(rows[j - 1])) == seq[j] for j in range(len(ctx), len(seq)))
    ends = model.tokenizer.is_eog(int(np.argmax(rows[-1])))
    return sum(lps), greedy, ends


@pytest.fixture(scope="module")
def model(tiny_chat_eog_gguf):
    return refinfer.load(tiny_chat_eog_gguf, backend="numba")


def test_lm_eval_local_completions_gets_refinfers_loglikelihoods(model, tmp_path, monkeypatch):
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    lm_eval = oracle_import("lm_eval")
    from lm_eval.tasks import TaskManager

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    with serve_model(model, parallel=4) as url:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"base_url={url}/v1/completions,model=tiny-chat-eog-f32.gguf,tokenizer_backend=remote,"
                       "num_concurrent=3,max_retries=1,batch_size=2",
            tasks=["refinfer_tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
            random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    samples = out["samples"]["refinfer_tiny_mc"]
    assert len(samples) == len(DOCS)
    n_ending = 0
    for s in samples:
        doc = s["doc"]
        for (ctx, cont), resp in zip([a["arguments"] for a in s["arguments"]] if isinstance(s["arguments"][0], dict)
                                     else s["arguments"], s["resps"]):
            got_ll, got_greedy = resp[0]
            want_ll, want_greedy, ends = direct_loglikelihood(model, ctx, cont)
            assert got_ll == want_ll, (doc["question"], cont, got_ll, want_ll)
            assert got_greedy == want_greedy
            n_ending += ends
    assert n_ending > 0, "no request ended at an end-of-generation token: the model does not test that case"
    want_acc = np.mean([int(np.argmax([direct_loglikelihood(model, d["question"], " " + c)[0] for c in d["choices"]])
                            == d["answer"]) for d in DOCS])
    assert out["results"]["refinfer_tiny_mc"]["acc,none"] == want_acc
