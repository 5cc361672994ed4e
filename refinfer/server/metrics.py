"""/metrics in Prometheus' text format (version 0.0.4): counters, gauges and histograms with
vLLM's metric names under the refinfer_ prefix.

Counters and histograms are updated in the event loop's thread as requests finish; the gauges
(running, waiting, KV blocks, prefix-cache counts) are read from Engine.stats() when scraped.
"""

from __future__ import annotations

import bisect

# seconds; vLLM's buckets for time_to_first_token_seconds and inter_token_latency_seconds
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)     # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float):
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, label: str) -> list[str]:
        """name_bucket{label,le="..."} (cumulative), name_sum{label}, name_count{label}."""
        out, acc = [], 0
        for le, c in zip(self.buckets + (float("inf"),), self.counts):
            acc += c
            out.append(f'{name}_bucket{{{label},le="{"+Inf" if le == float("inf") else repr(float(le))}"}} {acc}')
        return out + [f"{name}_sum{{{label}}} {self.sum!r}", f"{name}_count{{{label}}} {self.count}"]


class ServerMetrics:
    def __init__(self):
        self.requests = {}                  # finish reason -> requests (choices) finished so
        self.rejected = 0                   # 503: the queue was full
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def finished(self, result, e2e_s: float):
        """One choice done: its GenerationResult (finish_reason stop|length|cancelled|error)."""
        r = result.finish_reason
        self.requests[r] = self.requests.get(r, 0) + 1
        st = result.stats
        self.prompt_tokens += st.prompt_tokens
        self.generation_tokens += len(result.token_ids) + (result.eog is not None)
        if st.ttft_s is not None:
            self.ttft.observe(st.ttft_s)
        t = st.token_times
        for a, b in zip(t, t[1:]):
            self.itl.observe(b - a)
        self.e2e.observe(e2e_s)

    def render(self, stats, model_name: str, queued: int) -> str:
        """stats: Engine.stats(); queued: choices admitted by the server and not finished."""
        def metric(name, kind, help_, samples):
            lines.append(f"# HELP refinfer_{name} {help_}")
            lines.append(f"# TYPE refinfer_{name} {kind}")
            lines.extend(f"refinfer_{name}{s}" for s in samples)

        lines: list[str] = []
        label = f'model_name="{model_name}"'
        metric("request_success_total", "counter", "Requests (choices) finished, by finish reason.",
               [f'{{{label},finished_reason="{r}"}} {n}' for r, n in sorted(self.requests.items())]
               or [f'{{{label},finished_reason="stop"}} 0'])
        metric("requests_rejected_total", "counter", "Requests answered 503 because the queue was full.",
               [f"{{{label}}} {self.rejected}"])
        metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [f"{{{label}}} {self.prompt_tokens}"])
        metric("generation_tokens_total", "counter", "Generated tokens of finished requests (an end-of-generation token counts).",
               [f"{{{label}}} {self.generation_tokens}"])
        metric("num_requests_running", "gauge", "Sequences in the engine's running batch.", [f"{{{label}}} {stats.running}"])
        metric("num_requests_waiting", "gauge", "Sequences submitted and not running (new or preempted).",
               [f"{{{label}}} {stats.waiting}"])
        metric("num_requests_queued", "gauge", "Sequences admitted by the server and not finished (--parallel + --max-queue at most).",
               [f"{{{label}}} {queued}"])
        metric("num_preemptions_total", "counter", "Sequences preempted (blocks freed, to be recomputed).",
               [f"{{{label}}} {stats.preemptions}"])
        metric("kv_cache_blocks_total", "gauge", "KV-cache blocks in the pool.", [f"{{{label}}} {stats.blocks_total}"])
        metric("kv_cache_blocks_used", "gauge", "KV-cache blocks held by a sequence.", [f"{{{label}}} {stats.blocks_used}"])
        metric("kv_cache_blocks_cached", "gauge", "Unreferenced KV-cache blocks kept for prefix-cache hits.",
               [f"{{{label}}} {stats.blocks_cached}"])
        metric("kv_cache_blocks_free", "gauge", "Unreferenced, empty KV-cache blocks.", [f"{{{label}}} {stats.blocks_free}"])
        metric("kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks held by sequences.",
               [f"{{{label}}} {stats.blocks_used / max(stats.blocks_total, 1)!r}"])
        metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
               [f"{{{label}}} {stats.prefix_cache_queries}"])
        metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
               [f"{{{label}}} {stats.prefix_cache_hits}"])
        for name, h, help_ in (("time_to_first_token_seconds", self.ttft, "Submission to first generated token."),
                               ("inter_token_latency_seconds", self.itl, "Time between generated tokens."),
                               ("e2e_request_latency_seconds", self.e2e, "Request start to its last token.")):
            lines.append(f"# HELP refinfer_{name} {help_}")
            lines.append(f"# TYPE refinfer_{name} histogram")
            lines.extend(h.lines(f"refinfer_{name}", label))
        return "\n".join(lines) + "\n"
