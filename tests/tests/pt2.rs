//! The PT2 archive reader (torch.export, issue 7): weights read without Python equal the
//! checkpoint they were exported from; corrupt archives fail naming the file and the entry.

mod common;

use autodeploy_core::pt2::Pt2Archive;
use autodeploy_core::DType;
use common::*;

#[test]
fn exported_weights_equal_the_checkpoints() {
    for family in ["llama", "qwen3"] {
        let a = Pt2Archive::open(&fixture(&format!("pt2/{family}.pt2"))).unwrap();
        assert_eq!(a.model_name, "model");
        let targets = a.node_targets();
        assert!(targets.iter().any(|t| t == "torch.ops.aten.linear.default"), "{targets:?}");
        let g = import(family, DType::F32);
        let mut checked = 0;
        for w in &a.weights {
            // scripts/export.py wraps the HF model, so its weights gain a `model.` prefix.
            let hf = w.name.strip_prefix("model.").unwrap_or(&w.name);
            if !g.weights.contains(hf) {
                continue;
            }
            let got = a.load(&w.name).unwrap();
            let want = g.weights.load(hf, DType::F32).unwrap();
            assert_eq!(got.shape(), want.shape(), "{family} {hf}");
            assert_eq!(got.to_f32(), want.to_f32(), "{family} {hf}");
            checked += 1;
        }
        assert!(checked >= 20, "{family}: only {checked} weights matched by name");
    }
}

#[test]
fn a_module_that_is_not_a_transformer_reads_too() {
    let a = Pt2Archive::open(&fixture("pt2/mlp.pt2")).unwrap();
    let names: Vec<&str> = a.weights.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names.len(), 5, "{names:?}");
    let e = a.load("embed.weight").unwrap();
    assert_eq!(e.shape(), &[64, 16]);
    assert_eq!(
        a.node_targets(),
        [
            "torch.ops.aten.embedding.default",
            "torch.ops.aten.linear.default",
            "torch.ops.aten.gelu.default",
            "torch.ops.aten.linear.default",
            "torch.ops.aten.log_softmax.int"
        ]
    );
}

/// What to do with one zip entry: its new bytes, or `None` to leave it out.
type EntryEdit = dyn Fn(&str, Vec<u8>) -> Option<Vec<u8>>;

#[test]
fn corrupt_archives_fail_naming_the_file_and_entry() {
    let src = std::fs::read(fixture("pt2/mlp.pt2")).unwrap();
    let dir = std::env::temp_dir().join(format!("adpt2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Truncated: the zip directory is gone.
    let p = dir.join("truncated.pt2");
    std::fs::write(&p, &src[..src.len() / 2]).unwrap();
    let e = Pt2Archive::open(&p).err().unwrap().to_string();
    assert!(e.contains("truncated.pt2") && e.contains("zip"), "{e}");
    // Rewritten archives: bad JSON in the graph, a missing weight storage.
    let rewrite = |name: &str, edit: &EntryEdit| {
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(src.clone())).unwrap();
        let p = dir.join(name);
        let mut w = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
        for i in 0..z.len() {
            let mut f = z.by_index(i).unwrap();
            let n = f.name().to_string();
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut buf).unwrap();
            if let Some(b) = edit(&n, buf) {
                w.start_file(n, zip::write::SimpleFileOptions::default()).unwrap();
                std::io::Write::write_all(&mut w, &b).unwrap();
            }
        }
        w.finish().unwrap();
        p
    };
    let p =
        rewrite("badjson.pt2", &|n, b| Some(if n.ends_with("models/model.json") { b"{not json".to_vec() } else { b }));
    let e = Pt2Archive::open(&p).err().unwrap().to_string();
    assert!(e.contains("badjson.pt2") && e.contains("models/model.json") && e.contains("invalid JSON"), "{e}");
    let p = rewrite("noweight.pt2", &|n, b| (!n.ends_with("weights/weight_1")).then_some(b));
    let a = Pt2Archive::open(&p).unwrap();
    let e = a.load("up.weight").err().unwrap().to_string();
    assert!(e.contains("noweight.pt2") && e.contains("weights/weight_1"), "{e}");
    let p = rewrite("short.pt2", &|n, b| Some(if n.ends_with("weights/weight_0") { b[..10].to_vec() } else { b }));
    let e = Pt2Archive::open(&p).unwrap().load("embed.weight").err().unwrap().to_string();
    assert!(e.contains("reach past its storage"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn import_pt2(name: &str) -> autodeploy_core::Result<autodeploy_core::Graph> {
    let req = autodeploy_core::registry::ImportRequest {
        path: fixture(&format!("pt2/{name}")),
        dtype: None,
        max_batch_size: 8,
        max_seq_len: 128,
        dummy_weights: false,
    };
    autodeploy_core::registry::importer("torch-export").unwrap().import(&req)
}

/// A user's own nn.Module (embedding → linear → tanh GELU → linear → log_softmax, dynamic
/// sequence length) exported by torch.export runs end to end and matches torch's output.
#[test]
fn a_non_transformer_export_runs_end_to_end() {
    let g = import_pt2("mlp.pt2").unwrap();
    assert_eq!(g.symbols.get("s70").map(|r| (r.min, r.max)), Some((1, 512)));
    let r = safetensors::SafeTensors::deserialize(&std::fs::read(fixture("pt2/mlp.reference.safetensors")).unwrap())
        .unwrap()
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.shape().to_vec(), t.data().to_vec())))
        .collect::<std::collections::HashMap<_, _>>();
    let (ids_shape, ids) = &r["input_ids"];
    let ids: Vec<i64> = ids.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let (out_shape, want) = &r["output"];
    let want: Vec<f32> = want.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let mut m = compile(&g);
    let out = m.forward(&[autodeploy_core::Tensor::from_i64(ids_shape.clone(), ids).unwrap()], None).unwrap();
    assert_eq!(out[0].shape(), out_shape.as_slice());
    let err = out[0].to_f32().iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err <= 1e-5, "max |error| against torch: {err}");
    // Outside the exported range, the symbol check refuses the input by name.
    let long = autodeploy_core::Tensor::from_i64(vec![2, 600], vec![1; 1200]).unwrap();
    let e = m.forward(&[long], None).err().unwrap().to_string();
    assert!(e.contains("s70") && e.contains("[1, 512]"), "{e}");
}

/// An op the importer does not know yet fails the import naming the op, the node, and where in
/// the source model it came from.
#[test]
fn an_unknown_op_is_named_with_its_node_and_source_line() {
    let e = import_pt2("llama.pt2").err().unwrap().to_string();
    assert!(e.contains("torch.ops.aten.") && e.contains("node `"), "{e}");
    assert!(e.contains("exported from") && e.contains(".py"), "{e}");
}
