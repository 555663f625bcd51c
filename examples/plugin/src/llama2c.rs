//! `llama2c` (model importer): reads a checkpoint in llama2.c's format (`run.c`'s legacy
//! layout) and builds a Llama graph from the host's built-in ops, named as a graph dump names
//! them. The file: seven little-endian i32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
//! vocab_size, seq_len; a negative vocab_size means the classifier has its own table), then f32
//! tables: token embedding `[vocab, dim]`, attention norms `[layers, dim]`, wq `[layers, dim,
//! dim]`, wk and wv `[layers, kv_dim, dim]`, wo `[layers, dim, dim]`, FFN norms, w1 `[layers,
//! hidden, dim]`, w2 `[layers, dim, hidden]`, w3 `[layers, hidden, dim]`, the final norm `[dim]`,
//! two RoPE tables `[seq_len, head_size / 2]` (not needed: RoPE is computed from the positions),
//! and the classifier `[vocab, dim]` when it is not shared. llama2.c's RoPE rotates interleaved
//! pairs with base 10000 and its RMSNorm uses eps 1e-5.

use autodeploy_sdk::abi_stable::std_types::{RResult, RStr, RString};
use autodeploy_sdk::ffi::{GraphBuildRef, HostTensor};

/// Whether `path` looks like a llama2.c checkpoint: a `.bin` file whose header's sizes account
/// for the file's length (only the header is read).
pub extern "C" fn accepts(path: RStr<'_>) -> bool {
    let p = std::path::Path::new(path.as_str());
    p.extension().is_some_and(|e| e == "bin") && head_of(p).is_ok_and(|(head, len)| Header::parse(&head, len).is_ok())
}

/// The first 28 bytes of the file at `p` and its length.
fn head_of(p: &std::path::Path) -> std::io::Result<([u8; 28], u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut head = [0u8; 28];
    f.read_exact(&mut head)?;
    Ok((head, f.metadata()?.len()))
}

pub extern "C" fn import(path: RStr<'_>, options: RStr<'_>, graph: GraphBuildRef<'_>) -> RResult<RString, RString> {
    match build(path.as_str(), options.as_str(), graph) {
        Ok(s) => RResult::ROk(s.into()),
        Err(e) => RResult::RErr(format!("{}: {e}", path.as_str()).into()),
    }
}

struct Header {
    dim: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    seq_len: usize,
    shared_classifier: bool,
}

impl Header {
    /// The header at the start of `bytes`, checked against the file's length `len`.
    fn parse(bytes: &[u8], len: u64) -> Result<Header, String> {
        if bytes.len() < 28 {
            return Err(format!("{len} bytes: too short for the 28-byte header"));
        }
        let f: Vec<i32> = bytes[..28].chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let names = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"];
        for (i, (&v, n)) in f.iter().zip(names).enumerate() {
            if v == 0 || (v < 0 && i != 5) || v.unsigned_abs() > 1 << 20 {
                return Err(format!("header field {n} is {v}"));
            }
        }
        let h = Header {
            dim: f[0] as usize,
            hidden: f[1] as usize,
            layers: f[2] as usize,
            heads: f[3] as usize,
            kv_heads: f[4] as usize,
            vocab: f[5].unsigned_abs() as usize,
            seq_len: f[6] as usize,
            shared_classifier: f[5] > 0,
        };
        if !h.dim.is_multiple_of(h.heads) || !h.heads.is_multiple_of(h.kv_heads) || !(h.dim / h.heads).is_multiple_of(2)
        {
            return Err(format!(
                "dim {} over {} heads ({} kv heads) is not an even head size shared by whole kv groups",
                h.dim, h.heads, h.kv_heads
            ));
        }
        let want = 28 + 4 * h.floats() as u64;
        if len != want {
            return Err(format!("the header's sizes need {want} bytes, the file has {len}"));
        }
        Ok(h)
    }

    fn kv_dim(&self) -> usize {
        self.dim / self.heads * self.kv_heads
    }

    fn head_size(&self) -> usize {
        self.dim / self.heads
    }

    /// f32 values after the header.
    fn floats(&self) -> usize {
        let (d, h, l, kv) = (self.dim, self.hidden, self.layers, self.kv_dim());
        let per_layer = 2 * d + d * d + 2 * kv * d + d * d + 3 * h * d;
        let classifier = if self.shared_classifier { 0 } else { self.vocab * d };
        self.vocab * d + l * per_layer + d + self.seq_len * self.head_size() + classifier
    }
}

/// The f32 tables in file order, handed to the host as weights stored in `dtype`.
struct Tables<'a> {
    data: &'a [u8],
    at: usize,
    dtype: &'a str,
    layers: usize,
}

impl Tables<'_> {
    fn next(&mut self, n: usize) -> Vec<f32> {
        let b = &self.data[self.at..self.at + 4 * n];
        self.at += 4 * n;
        b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    fn weight(&mut self, g: &mut GraphBuildRef<'_>, name: &str, shape: &[u64]) -> Result<u32, String> {
        let n = shape.iter().product::<u64>() as usize;
        let tensor = HostTensor { shape: shape.iter().copied().collect(), data: self.next(n).into() };
        ok(g.weight(name.into(), self.dtype.into(), tensor))
    }

    /// One table per layer, stored back to back.
    fn per_layer(&mut self, g: &mut GraphBuildRef<'_>, name: &str, shape: &[u64]) -> Result<Vec<u32>, String> {
        (0..self.layers).map(|i| self.weight(g, &format!("layers.{i}.{name}"), shape)).collect()
    }
}

/// `key = value` of the host's options (a flat TOML table).
fn option<'a>(options: &'a str, key: &str) -> Option<&'a str> {
    options.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// Calls into the host, turning its error into ours.
fn ok<T>(r: RResult<T, RString>) -> Result<T, String> {
    r.into_result().map_err(|e| e.into_string())
}

/// Adds node `name`: `op(ins)` with attribute text `attrs`.
fn n(g: &mut GraphBuildRef<'_>, name: &str, op: &str, ins: &[u32], attrs: &str) -> Result<u32, String> {
    ok(g.node(name.into(), op.into(), ins.into(), attrs.into()))
}

fn build(path: &str, options: &str, mut g: GraphBuildRef<'_>) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let h = Header::parse(&bytes, bytes.len() as u64)?;
    if option(options, "dummy_weights") == Some("true") {
        return Err("random weights (load_format = \"dummy\") are not supported: the file is the model".into());
    }
    // The checkpoint is f32; a requested dtype is what the graph computes in.
    let dtype = match option(options, "dtype") {
        None | Some("f32") => "f32",
        Some(d @ ("bf16" | "f16")) => d,
        Some(d) => return Err(format!("dtype `{d}` is not f32, bf16 or f16")),
    };
    let max_seq: usize = option(options, "max_seq_len").and_then(|v| v.parse().ok()).unwrap_or(h.seq_len);
    let (d, hs, kv) = (h.dim as u64, h.head_size() as u64, h.kv_dim() as u64);
    let mut t = Tables { data: &bytes, at: 28, dtype, layers: h.layers };
    let g = &mut g;
    let hid = h.hidden as u64;
    let embed = t.weight(g, "tok_embeddings", &[h.vocab as u64, d])?;
    let att_norm = t.per_layer(g, "attention_norm", &[d])?;
    let wq = t.per_layer(g, "wq", &[d, d])?;
    let wk = t.per_layer(g, "wk", &[kv, d])?;
    let wv = t.per_layer(g, "wv", &[kv, d])?;
    let wo = t.per_layer(g, "wo", &[d, d])?;
    let ffn_norm = t.per_layer(g, "ffn_norm", &[d])?;
    let w1 = t.per_layer(g, "w1", &[hid, d])?;
    let w2 = t.per_layer(g, "w2", &[d, hid])?;
    let w3 = t.per_layer(g, "w3", &[hid, d])?;
    let norm = t.weight(g, "norm", &[d])?;
    t.next(h.seq_len * h.head_size()); // the RoPE tables
    let classifier = if h.shared_classifier { embed } else { t.weight(g, "output", &[h.vocab as u64, d])? };

    g.symbol("seq".into(), 1, max_seq.min(h.seq_len) as u64);
    let ids = ok(g.input("input_ids".into(), "i64".into(), "[1, seq]".into()))?;
    let pos = ok(g.input("position_ids".into(), "i64".into(), "[1, seq]".into()))?;

    // RoPE angles, once for all layers: position · 10000^(-2i / head_size), as cos/sin tables
    // [1, 1, seq, head_size] in the rotate-half layout the interleaved RoPE op expects.
    let half = hs / 2;
    let inv: Vec<f32> = (0..half).map(|i| 10000f32.powf(-2.0 * i as f32 / hs as f32)).collect();
    let inv_freq =
        ok(g.weight("rope.inv_freq".into(), "f32".into(), HostTensor { shape: vec![half].into(), data: inv.into() }))?;
    let p = n(g, "rope.pos", "aten.unsqueeze", &[pos], "-1")?;
    let p = n(g, "rope.pos_f32", "aten._to_copy", &[p], "dtype=f32")?;
    let freqs = n(g, "rope.freqs", "aten.mul.Tensor", &[p, inv_freq], "")?;
    let angles = n(g, "rope.angles", "aten.cat", &[freqs, freqs], "dim=-1")?;
    let table = |g: &mut GraphBuildRef<'_>, f: &str| -> Result<u32, String> {
        let x = n(g, &format!("rope.{f}_f32"), &format!("aten.{f}"), &[angles], "")?;
        let x = if dtype == "f32" {
            x
        } else {
            n(g, &format!("rope.{f}_cast"), "aten._to_copy", &[x], &format!("dtype={dtype}"))?
        };
        n(g, &format!("rope.{f}"), "aten.unsqueeze", &[x], "1")
    };
    let (cos, sin) = (table(g, "cos")?, table(g, "sin")?);

    let rms = format!("eps=1e-05, norm_dtype={dtype}");
    let gqa = if h.kv_heads < h.heads { ", enable_gqa=true" } else { "" };
    let mut x = n(g, "embed", "aten.embedding", &[embed, ids], "")?;
    for i in 0..h.layers {
        let l = |s: &str| format!("l{i}.{s}");
        let hn = n(g, &l("attn_norm"), "torch_rmsnorm", &[x, att_norm[i]], &rms)?;
        let heads_of = |g: &mut GraphBuildRef<'_>, w: u32, name: &str, heads: usize| -> Result<u32, String> {
            let y = n(g, &l(name), "aten.linear", &[hn, w], "")?;
            let y = n(g, &l(&format!("{name}.view")), "aten.view", &[y], &format!("[1, seq, {heads}, {hs}]"))?;
            n(g, &l(&format!("{name}.t")), "aten.transpose.int", &[y], "1, 2")
        };
        let q = heads_of(g, wq[i], "q", h.heads)?;
        let k = heads_of(g, wk[i], "k", h.kv_heads)?;
        let v = heads_of(g, wv[i], "v", h.kv_heads)?;
        let q = n(g, &l("q_rope"), "torch_rope_with_explicit_cos_sin", &[q, cos, sin], "interleaved=true")?;
        let k = n(g, &l("k_rope"), "torch_rope_with_explicit_cos_sin", &[k, cos, sin], "interleaved=true")?;
        let a = n(g, &l("attn"), "aten.scaled_dot_product_attention", &[q, k, v], &format!("is_causal=true{gqa}"))?;
        let a = n(g, &l("attn.t"), "aten.transpose.int", &[a], "1, 2")?;
        let a = n(g, &l("attn.flat"), "aten.reshape", &[a], "[1, seq, -1]")?;
        let o = n(g, &l("wo"), "aten.linear", &[a, wo[i]], "")?;
        x = n(g, &l("attn_residual"), "aten.add.Tensor", &[x, o], "")?;
        let hn = n(g, &l("ffn_norm"), "torch_rmsnorm", &[x, ffn_norm[i]], &rms)?;
        let gate = n(g, &l("w1"), "aten.linear", &[hn, w1[i]], "")?;
        let up = n(g, &l("w3"), "aten.linear", &[hn, w3[i]], "")?;
        let act = n(g, &l("silu"), "aten.silu", &[gate], "")?;
        let m = n(g, &l("swiglu"), "aten.mul.Tensor", &[act, up], "")?;
        let down = n(g, &l("w2"), "aten.linear", &[m, w2[i]], "")?;
        x = n(g, &l("ffn_residual"), "aten.add.Tensor", &[x, down], "")?;
    }
    let x = n(g, "norm", "torch_rmsnorm", &[x, norm], &rms)?;
    let logits = n(g, "logits", "aten.linear", &[x, classifier], "")?;
    ok(g.output(logits))?;
    Ok(format!(
        "llama2.c checkpoint: {} layers, dim {}, heads {}/{} (kv), hidden {}, vocab {}{}, seq_len {}; computing in {dtype}",
        h.layers,
        h.dim,
        h.heads,
        h.kv_heads,
        h.hidden,
        h.vocab,
        if h.shared_classifier { " (shared classifier)" } else { "" },
        h.seq_len
    ))
}
