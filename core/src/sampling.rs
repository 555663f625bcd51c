//! Per-request sampling: greedy, temperature, top-k, top-p, with a seeded generator so a seed
//! gives the same tokens every run.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k filter.
    pub top_k: usize,
    /// In (0, 1]; 1 means no nucleus filter.
    pub top_p: f32,
    pub seed: Option<u64>,
    /// Generation stops after emitting any of these.
    pub stop_token_ids: Vec<i64>,
    /// Generation stops when the decoded text contains any of these (needs a tokenizer); the
    /// completion's text ends before it.
    pub stop_strings: Vec<String>,
    /// Stop tokens cannot be picked, nor stop strings end the text, before this many tokens.
    pub min_tokens: usize,
    /// Report each generated token's log-probability and the `logprobs` most likely
    /// alternatives' (at most `MAX_LOGPROBS`); `None`: no log-probabilities.
    pub logprobs: Option<usize>,
}

/// The most alternatives a token's log-probabilities list (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 16,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            min_tokens: 0,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::Input { input: field.into(), msg });
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", "must be at least 1".into());
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", format!("{} is not a finite number >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} is outside (0, 1]", self.top_p));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return bad("stop_strings", "an empty stop string would stop at once".into());
        }
        if self.min_tokens > self.max_new_tokens {
            return bad(
                "min_tokens",
                format!("{} is more than max_new_tokens = {}", self.min_tokens, self.max_new_tokens),
            );
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_LOGPROBS) {
            return bad("logprobs", format!("{n} alternatives asked; at most {MAX_LOGPROBS}"));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_os_rng(),
        };
        Sampler { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> i64 {
        let d = self.draw();
        pick(logits, &d)
    }

    /// What picking this sequence's next token needs besides the logits: its parameters and,
    /// unless greedy, one uniform draw from the sequence's generator (the only draw a token
    /// takes, so the CPU and a device that samples where its logits are pick alike).
    pub fn draw(&mut self) -> RowDraw {
        if self.params.is_greedy() {
            return RowDraw { temperature: 0.0, top_k: 0, top_p: 1.0, u: 0.0 };
        }
        let u: f32 = self.rng.random();
        RowDraw { temperature: self.params.temperature, top_k: self.params.top_k, top_p: self.params.top_p, u }
    }
}

/// One token's sampling: temperature (0: argmax), top-k (0: off), top-p (1: off) and the
/// uniform draw `u` in [0, 1) that picks within what the filters keep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowDraw {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub u: f32,
}

/// The token `d` picks from `logits`: scores x/T; top-k keeps the first `top_k` in descending
/// order (ties: lower index first), top-p the shortest such prefix whose softmax mass reaches
/// `top_p`; the token is the first kept one in index order whose cumulative mass exceeds `u`
/// times the kept mass (inverse-CDF sampling of the kept set, which needs no sort: only the
/// top-k/top-p cuts are made in sorted order).
pub fn pick(logits: &[f32], d: &RowDraw) -> i64 {
    if d.temperature <= 0.0 || d.top_k == 1 {
        return argmax(logits) as i64;
    }
    let t = d.temperature;
    let score = |i: usize| logits[i] / t;
    let max = (0..logits.len()).map(score).fold(f32::NEG_INFINITY, f32::max);
    // Masses in f64: summed over up to a whole vocabulary, f32 would drift by ~1e-5 and move the
    // boundaries between tokens (the GPU sums exactly, in fixed point).
    let masses: Vec<f64> = (0..logits.len()).map(|i| ((score(i) - max) as f64).exp()).collect();
    let mass = |i: usize| masses[i];
    let mut kept: Option<Vec<bool>> = None;
    if (d.top_k > 0 && d.top_k < logits.len()) || d.top_p < 1.0 {
        // Descending order, ties by index: the cuts.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let desc = |a: &usize, b: &usize| score(*b).total_cmp(&score(*a)).then(a.cmp(b));
        let mut n = logits.len();
        if d.top_k > 0 && d.top_k < n {
            order.select_nth_unstable_by(d.top_k - 1, desc);
            n = d.top_k;
        }
        order.truncate(n);
        order.sort_by(desc);
        if d.top_p < 1.0 {
            let z: f64 = order.iter().map(|&i| mass(i)).sum();
            let mut acc = 0.0;
            for (j, &i) in order.iter().enumerate() {
                acc += mass(i);
                if acc >= d.top_p as f64 * z {
                    n = j + 1;
                    break;
                }
            }
            order.truncate(n);
        }
        let mut keep = vec![false; logits.len()];
        order.iter().for_each(|&i| keep[i] = true);
        kept = Some(keep);
    }
    let is_kept = |i: usize| kept.as_ref().is_none_or(|k| k[i]);
    let z: f64 = (0..logits.len()).filter(|&i| is_kept(i)).map(mass).sum();
    let target = d.u as f64 * z;
    let mut acc = 0.0;
    let mut last = 0;
    for i in (0..logits.len()).filter(|&i| is_kept(i)) {
        acc += mass(i);
        if acc > target {
            return i as i64;
        }
        last = i;
    }
    // u·z rounded up to z: the last kept token.
    last as i64
}

/// A generated token's log-probability under the model (the raw logits' log-softmax, before
/// temperature and filters, as OpenAI and vLLM report it) and the most likely alternatives'.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// `(token, logprob)`, most likely first (ties: lower id first).
    pub top: Vec<(i64, f32)>,
}

/// `token`'s log-probability in `logits` and the `top` most likely tokens', in f64 sums.
pub fn logprobs(logits: &[f32], token: i64, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + z.ln();
    let lp = |x: f32| (x as f64 - lse) as f32;
    let mut best: Vec<usize> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in logits.iter().enumerate() {
            // Insertion into the short sorted list; ties keep the lower id first.
            if best.len() < top || x > logits[best[best.len() - 1]] {
                let at = best.partition_point(|&j| logits[j] >= x);
                best.insert(at, i);
                best.truncate(top);
            }
        }
    }
    let chosen = logits.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY);
    TokenLogprobs { logprob: lp(chosen), top: best.into_iter().map(|i| (i as i64, lp(logits[i]))).collect() }
}

/// Index of the largest value (the first, on ties), as torch's argmax.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_against_hand_computed_values() {
        // Weights 1, 2, 3, 4, 10 as logits ln w + 7 (a shift softmax ignores): p = w / 20.
        let logits: Vec<f32> = [1.0f64, 2.0, 3.0, 10.0, 4.0, 3.0].iter().map(|w| (w.ln() + 7.0) as f32).collect();
        let total = 23.0f64;
        let l = logprobs(&logits, 1, 3);
        assert!((l.logprob as f64 - (2.0 / total).ln()).abs() < 1e-5, "{l:?}");
        let ids: Vec<i64> = l.top.iter().map(|t| t.0).collect();
        // 10, then 4, then the two 3s (ids 2 and 5): the lower id first.
        assert_eq!(ids, [3, 4, 2]);
        for (id, lp) in &l.top {
            let w = [1.0, 2.0, 3.0, 10.0, 4.0, 3.0][*id as usize];
            assert!((*lp as f64 - (w / total).ln()).abs() < 1e-5);
        }
        assert!(logprobs(&logits, 0, 0).top.is_empty());
        // A masked (-inf) logit: its probability is 0.
        let mut masked = logits.clone();
        masked[3] = f32::NEG_INFINITY;
        assert_eq!(logprobs(&masked, 3, 1).logprob, f32::NEG_INFINITY);
        assert_eq!(logprobs(&masked, 3, 1).top[0].0, 4);
    }

    /// `pick` over a grid of draws u = (i + 0.5) / N gives each token the share of draws its
    /// probability says, against distributions worked out by hand (not by `pick`'s own steps):
    /// weights 1, 2, 3, 4, 10 as logits ln w, so softmax at temperature 1 is w / 20.
    #[test]
    fn pick_follows_hand_computed_distributions() {
        let w = [1.0f64, 2.0, 3.0, 4.0, 10.0];
        let logits: Vec<f32> = w.iter().map(|x| x.ln() as f32).collect();
        let n = 20_000;
        let shares = |temperature: f32, top_k: usize, top_p: f32| -> Vec<f64> {
            let mut count = [0usize; 5];
            for i in 0..n {
                let u = (i as f32 + 0.5) / n as f32;
                count[pick(&logits, &RowDraw { temperature, top_k, top_p, u }) as usize] += 1;
            }
            count.iter().map(|&c| c as f64 / n as f64).collect()
        };
        let norm = |v: [f64; 5]| -> Vec<f64> {
            let z: f64 = v.iter().sum();
            v.iter().map(|x| x / z).collect()
        };
        let cases: [(f32, usize, f32, Vec<f64>); 5] = [
            // Plain: w / 20.
            (1.0, 0, 1.0, norm([1.0, 2.0, 3.0, 4.0, 10.0])),
            // Temperature 2: softmax(ln w / 2) is sqrt(w), normalised.
            (2.0, 0, 1.0, norm(w.map(f64::sqrt))),
            // top_k 3: the three largest, 10, 4 and 3, renormalised.
            (1.0, 3, 1.0, norm([0.0, 0.0, 3.0, 4.0, 10.0])),
            // top_p 0.65: 0.5 < 0.65 <= 0.5 + 0.2, so tokens 4 and 3 only.
            (1.0, 0, 0.65, norm([0.0, 0.0, 0.0, 4.0, 10.0])),
            // top_k 4 (10, 4, 3, 2 of 19), then top_p 0.8: 10/19 + 4/19 = 0.737 < 0.8 <= 0.895.
            (1.0, 4, 0.8, norm([0.0, 0.0, 3.0, 4.0, 10.0])),
        ];
        for (t, k, p, want) in cases {
            let got = shares(t, k, p);
            for (tok, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 2.0 / n as f64, "T {t} top_k {k} top_p {p}: token {tok} {g} vs {w}");
            }
        }
    }

    #[test]
    fn greedy_topk_topp_and_seeds() {
        let logits = [0.0, 3.0, 1.0, 2.9, -5.0];
        let mut g = Sampler::new(SamplingParams::default());
        assert_eq!(g.sample(&logits), 1);
        // top_k = 2: only tokens 1 and 3 can appear.
        let p = SamplingParams { temperature: 1.0, top_k: 2, seed: Some(7), ..Default::default() };
        let mut s = Sampler::new(p.clone());
        let draws: Vec<i64> = (0..200).map(|_| s.sample(&logits)).collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 3));
        assert!(draws.contains(&1) && draws.contains(&3));
        // Same seed, same tokens.
        let mut s2 = Sampler::new(p);
        assert_eq!((0..200).map(|_| s2.sample(&logits)).collect::<Vec<_>>(), draws);
        // top_p small: only the most likely token survives.
        let mut s3 =
            Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.01, seed: Some(1), ..Default::default() });
        assert!((0..50).all(|_| s3.sample(&logits) == 1));
    }

    #[test]
    fn invalid_params_name_the_field() {
        let e = SamplingParams { max_new_tokens: 0, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("max_new_tokens"), "{e}");
        for bad in [0.0, 1.5, -0.1, f32::NAN] {
            let e = SamplingParams { top_p: bad, ..Default::default() }.validate().unwrap_err().to_string();
            assert!(e.contains("top_p"), "{e}");
        }
        let e = SamplingParams { temperature: -1.0, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("temperature"), "{e}");
    }
}
