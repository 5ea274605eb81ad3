"""Prometheus metrics of `r1forge serve`, exposed as text at /metrics.

Each `ServerMetrics` owns a `CollectorRegistry` (never the process-global one), so several servers (and
tests) can live in one process. Request-side metrics are counted as requests finish; engine-side gauges
(queue length, running sequences, KV-cache usage) are read from an engine-stats callback at scrape time,
so they are never stale and the engine loop pays nothing for them. Names follow vLLM's with an `r1forge_`
prefix, and every series carries a `model_name` label, so vLLM dashboards port by renaming.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Buckets as in vLLM: from sub-millisecond decode steps on a GPU to minutes for long reasoning on a CPU.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)

# engine stats key -> (metric name, help); these keys must be in the callback's mapping
ENGINE_GAUGES = {
    "waiting": ("r1forge_num_requests_waiting", "Sequences waiting in the scheduler queue."),
    "running": ("r1forge_num_requests_running", "Sequences running (prefilling or decoding)."),
    "cache_usage": ("r1forge_kv_cache_usage_perc", "Fraction of KV-cache blocks in use, 0 to 1."),
}
# optional engine counters, exported when the callback provides them
ENGINE_COUNTERS = {
    "preemptions": ("r1forge_num_preemptions", "Sequences preempted for lack of cache blocks."),
    "prefix_hit_tokens": ("r1forge_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache."),
    "static_decode_steps": ("r1forge_static_decode_steps", "Decode steps run at fixed shapes (CUDA graphs / compile)."),
    "spec_draft_tokens": ("r1forge_spec_decode_num_draft_tokens", "Tokens the MTP drafter proposed."),
    "spec_accepted_tokens": ("r1forge_spec_decode_num_accepted_tokens", "Drafted tokens the target accepted."),
    "spec_verify_steps": ("r1forge_spec_decode_num_drafts", "Sequence-steps that verified drafts."),
}
# optional engine gauges of speculative decoding, exported when the engine speculates
SPEC_GAUGES = {
    "spec_acceptance_rate": ("r1forge_spec_decode_acceptance_rate", "Accepted / drafted tokens, 0 to 1."),
    "spec_mean_accepted_length": ("r1forge_spec_decode_mean_acceptance_length",
                                  "Tokens a verifying step emits per sequence (1 + accepted drafts)."),
}
SPEC_POSITION_PREFIX = "spec_acceptance_rate_pos"  # per draft position j: spec_acceptance_rate_pos{j}

EngineStatsFn = Callable[[], Mapping[str, float]]


class _EngineCollector(Collector):
    """Calls the engine-stats callback once per scrape and turns the mapping into metric families."""

    def __init__(self, stats_fn: EngineStatsFn, model_name: str) -> None:
        self.stats_fn = stats_fn
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.stats_fn()
        missing = [key for key in ENGINE_GAUGES if key not in stats]
        if missing:
            raise KeyError(f"engine stats lack {missing}; got keys {sorted(stats)}")
        for key, (name, doc) in ENGINE_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], float(stats[key]))
            yield family
        for key, (name, doc) in ENGINE_COUNTERS.items():
            if key in stats:
                family = CounterMetricFamily(name, doc, labels=["model_name"])
                family.add_metric([self.model_name], float(stats[key]))
                yield family
        for key, (name, doc) in SPEC_GAUGES.items():
            if key in stats:
                family = GaugeMetricFamily(name, doc, labels=["model_name"])
                family.add_metric([self.model_name], float(stats[key]))
                yield family
        positions = sorted((int(key[len(SPEC_POSITION_PREFIX):]), float(v)) for key, v in stats.items()
                           if key.startswith(SPEC_POSITION_PREFIX))
        if positions:
            family = GaugeMetricFamily("r1forge_spec_decode_acceptance_rate_per_pos",
                                       "Acceptance rate of the j-th drafted token (1-based position).",
                                       labels=["model_name", "position"])
            for j, rate in positions:
                family.add_metric([self.model_name, str(j)], rate)
            yield family


class ServerMetrics:
    """The metrics of one server instance.

    Args:
        model_name: value of the `model_name` label.
        engine_stats: returns the engine's current stats (`LLMEngine.stats()` / `AsyncLLM.stats()` keys:
            `waiting`, `running`, `cache_usage`, optionally `preemptions`, `prefix_hit_tokens`); called at
            scrape time. None: no engine gauges (a server without an engine, e.g. in tests).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, engine_stats: EngineStatsFn | None = None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("r1forge_requests", "HTTP requests by endpoint and status code.",
                                ["model_name", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("r1forge_prompt_tokens", "Prompt tokens processed.", ["model_name"],
                                     registry=r)
        self.generation_tokens = Counter("r1forge_generation_tokens", "Completion tokens generated.",
                                         ["model_name"], registry=r)
        self.ttft = Histogram("r1forge_time_to_first_token_seconds", "Time from arrival to the first token.",
                              ["model_name"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("r1forge_time_per_output_token_seconds",
                              "Mean time per completion token after the first, one sample per request.",
                              ["model_name"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("r1forge_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             ["model_name"], buckets=E2E_BUCKETS, registry=r)
        if engine_stats is not None:
            r.register(_EngineCollector(engine_stats, model_name))

    def record_request(self, endpoint: str, status: int) -> None:
        """Count one HTTP request (any outcome: 200, 400, 503...) to `endpoint` such as "/v1/chat/completions"."""
        self.requests.labels(self.model_name, endpoint, str(status)).inc()

    def record_tokens(self, prompt_tokens: int, generation_tokens: int) -> None:
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.generation_tokens.labels(self.model_name).inc(generation_tokens)

    def record_latency(self, *, e2e: float, ttft: float | None, generation_tokens: int) -> None:
        """Observe one finished generation's latencies, in seconds since its arrival.

        TPOT is (e2e - ttft) / (generation_tokens - 1), the decode speed the client saw; it is skipped for
        completions of fewer than two tokens. ttft None (no token was produced) skips both token metrics.
        """
        self.e2e.labels(self.model_name).observe(e2e)
        if ttft is None:
            return
        self.ttft.labels(self.model_name).observe(ttft)
        if generation_tokens > 1:
            self.tpot.labels(self.model_name).observe(max(e2e - ttft, 0.0) / (generation_tokens - 1))

    def render(self) -> bytes:
        """The text exposition for GET /metrics (serve with `content_type`)."""
        return generate_latest(self.registry)
