"""lm.serve's Prometheus metrics (one registry a server, so tests can run several)."""

import prometheus_client as prom


class Metrics:
  """Prometheus metrics of one server (its own registry, so tests can run several)."""

  def __init__(self):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter("lm_requests", "HTTP requests by endpoint and status.",
                                 ["endpoint", "status"], registry=r)
    self.errors = prom.Counter("lm_request_errors", "Failed requests by kind.", ["kind"],
                               registry=r)
    self.queue_depth = prom.Gauge("lm_queue_depth", "Completions waiting for a batch.",
                                  registry=r)
    self.time_to_first_token = prom.Histogram(
        "lm_time_to_first_token_seconds", "From request to its first generated token.",
        buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
    self.time_per_token = prom.Histogram(
        "lm_time_per_output_token_seconds", "Mean time per generated token after the first.",
        buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1), registry=r)
    self.generated_tokens = prom.Counter("lm_generated_tokens", "Tokens generated.",
                                         registry=r)
    self.batch_rows = prom.Histogram("lm_batch_rows", "Completions per decode batch.",
                                     buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
    # The continuous engine's state, set after every iteration.
    self.running = prom.Gauge("lm_running_requests", "Completions in decode slots.",
                              registry=r)
    self.slot_occupancy = prom.Gauge("lm_slot_occupancy", "Share of decode slots in use.",
                                     registry=r)
    self.page_occupancy = prom.Gauge("lm_page_occupancy", "Share of KV pages held.",
                                     registry=r)
    self.prefix_lookups = prom.Counter("lm_prefix_cache_lookups", "Prompt pages looked up "
                                       "in the prefix cache.", registry=r)
    self.prefix_hits = prom.Counter("lm_prefix_cache_hits", "Prompt pages found there.",
                                    registry=r)
    self.preemptions = prom.Counter("lm_preemptions", "Completions preempted for pages "
                                    "(recomputed later).", registry=r)
    self.prompt_tokens = prom.Counter("lm_prompt_tokens", "Prompt tokens of admitted "
                                      "completions.", registry=r)
    self.end_to_end = prom.Histogram(
        "lm_request_seconds", "From request to its last token.",
        buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)

  def text(self):
    return prom.generate_latest(self.registry)
