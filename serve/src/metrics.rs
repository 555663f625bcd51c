//! What `GET /metrics` reports, in the Prometheus text format: vLLM's metric names with the
//! `autodeploy:` prefix (so a vLLM dashboard adapts by changing the prefix), each labelled with
//! the served model's name. The engine thread updates them after every step.

use std::fmt::Write;

/// Upper bounds (seconds) of the latency histograms' buckets, vLLM's for time to first token
/// (the others share them: from a millisecond to a few minutes).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];

#[derive(Clone, Debug)]
pub struct Histogram {
    /// Observations at most each bound (not cumulative; summed when rendered).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; LATENCY_BUCKETS.len()], sum: 0.0, count: 0 }
    }
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| seconds <= b) {
            self.counts[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// The server's gauges, counters and histograms.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub running: usize,
    pub waiting: usize,
    /// KV-cache pages in all, held by requests, and kept only by the prefix cache (free to
    /// take, so not counted as used).
    pub pages_total: usize,
    pub pages_used: usize,
    pub pages_prefix_only: usize,
    /// Prompt tokens looked up in the prefix cache, and found there.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub preemptions: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    /// Finished requests by reason (`stop`, `length`, `abort`), and those that failed.
    pub finished_stop: u64,
    pub finished_length: u64,
    pub finished_abort: u64,
    pub failed: u64,
    /// Requests refused because the queue was full (answered 429).
    pub rejected: u64,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue: Histogram,
}

impl Metrics {
    /// The Prometheus text exposition (version 0.0.4).
    pub fn render(&self, model: &str) -> String {
        let mut out = String::new();
        let label = format!("model_name=\"{}\"", model.replace('\\', "\\\\").replace('"', "\\\""));
        let mut one = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP autodeploy:{name} {help}\n# TYPE autodeploy:{name} {kind}");
            let _ = writeln!(out, "autodeploy:{name}{{{label}}} {value}");
        };
        one("num_requests_running", "gauge", "Requests in the running batch.", self.running as f64);
        one("num_requests_waiting", "gauge", "Requests waiting to be scheduled.", self.waiting as f64);
        let usage = if self.pages_total == 0 { 0.0 } else { self.pages_used as f64 / self.pages_total as f64 };
        one("kv_cache_usage_perc", "gauge", "Fraction of KV-cache pages held by requests (1 = full).", usage);
        one("kv_cache_pages_in_use", "gauge", "KV-cache pages held by requests.", self.pages_used as f64);
        one("kv_cache_pages_total", "gauge", "KV-cache pages in all.", self.pages_total as f64);
        one(
            "prefix_cache_pages",
            "gauge",
            "KV-cache pages only the prefix cache keeps (evicted when needed).",
            self.pages_prefix_only as f64,
        );
        let counters: [(&str, &str, u64); 6] = [
            ("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.", self.prefix_queries),
            ("prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", self.prefix_hits),
            ("num_preemptions_total", "Requests preempted (pages freed, recomputed later).", self.preemptions),
            ("prompt_tokens_total", "Prompt tokens of admitted requests.", self.prompt_tokens),
            ("generation_tokens_total", "Tokens generated.", self.generation_tokens),
            ("request_rejected_total", "Requests refused with 429 because the queue was full.", self.rejected),
        ];
        for (name, help, v) in counters {
            one(name, "counter", help, v as f64);
        }
        let _ = writeln!(
            out,
            "# HELP autodeploy:request_success_total Finished requests by reason.\n# TYPE autodeploy:request_success_total counter"
        );
        for (reason, v) in
            [("stop", self.finished_stop), ("length", self.finished_length), ("abort", self.finished_abort)]
        {
            let _ = writeln!(out, "autodeploy:request_success_total{{{label},finished_reason=\"{reason}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP autodeploy:request_failure_total Requests that failed in the engine.\n# TYPE autodeploy:request_failure_total counter\nautodeploy:request_failure_total{{{label}}} {}",
            self.failed
        );
        let hists = [
            ("time_to_first_token_seconds", "Time from arrival to the first token.", &self.ttft),
            ("inter_token_latency_seconds", "Time between consecutive tokens of a request.", &self.itl),
            ("e2e_request_latency_seconds", "Time from arrival to the last token.", &self.e2e),
            ("request_queue_time_seconds", "Time from arrival to the first step.", &self.queue),
        ];
        for (name, help, h) in hists {
            let _ = writeln!(out, "# HELP autodeploy:{name} {help}\n# TYPE autodeploy:{name} histogram");
            let mut acc = 0;
            for (b, c) in LATENCY_BUCKETS.iter().zip(&h.counts) {
                acc += c;
                let _ = writeln!(out, "autodeploy:{name}_bucket{{{label},le=\"{b}\"}} {acc}");
            }
            let _ = writeln!(out, "autodeploy:{name}_bucket{{{label},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "autodeploy:{name}_sum{{{label}}} {}", h.sum);
            let _ = writeln!(out, "autodeploy:{name}_count{{{label}}} {}", h.count);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_values_are_labelled() {
        let mut m = Metrics { running: 3, pages_total: 10, pages_used: 4, ..Default::default() };
        for s in [0.003, 0.003, 0.05, 3.0, 99999.0] {
            m.ttft.observe(s);
        }
        let text = m.render("my \"model\"");
        let line = |prefix: &str| -> f64 {
            let l = text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
            l.rsplit(' ').next().unwrap().parse().unwrap()
        };
        let label = r#"model_name="my \"model\"""#;
        assert_eq!(line(&format!("autodeploy:num_requests_running{{{label}}}")), 3.0);
        assert_eq!(line(&format!("autodeploy:kv_cache_usage_perc{{{label}}}")), 0.4);
        let b = |le: &str| line(&format!("autodeploy:time_to_first_token_seconds_bucket{{{label},le=\"{le}\"}}"));
        assert_eq!([b("0.001"), b("0.005"), b("0.06"), b("5"), b("2560"), b("+Inf")], [0.0, 2.0, 3.0, 4.0, 4.0, 5.0]);
        assert_eq!(line(&format!("autodeploy:time_to_first_token_seconds_count{{{label}}}")), 5.0);
        // Every sample line is `name{labels} value`; every metric has HELP and TYPE.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = l.rsplit_once(' ').unwrap();
            assert!(name.starts_with("autodeploy:") && name.ends_with('}'), "{l}");
            value.parse::<f64>().unwrap();
        }
        assert_eq!(text.matches("# TYPE").count(), text.matches("# HELP").count());
    }
}
