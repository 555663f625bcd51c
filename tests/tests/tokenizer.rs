//! A Hugging Face folder's `tokenizer.json` and `tokenizer_config.json` read by
//! `Tokenizer::from_hf_dir`, against what transformers' `AutoTokenizer` makes of the same folder
//! (tests/fixtures/make_tokenizer_fixture.py): ids of hard strings, decoding, bos/eos, the chat
//! template and its ids.

mod common;

use autodeploy_core::tokenizer::{ChatMessage, Tokenizer};
use common::fixture;

#[test]
fn an_hf_folder_tokenizes_as_transformers_does() {
    let dir = fixture("tokenizer");
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let tok = Tokenizer::from_hf_dir(&dir).unwrap().expect("the folder has a tokenizer.json");
    assert_eq!(tok.vocab_size() as u64, refs["vocab_size"].as_u64().unwrap());
    assert_eq!(tok.bos_id, refs["bos_id"].as_i64(), "bos_token (a plain string in the config)");
    assert_eq!(tok.eos_id, refs["eos_id"].as_i64(), "eos_token (an AddedToken object in the config)");
    let ids =
        |v: &serde_json::Value| -> Vec<i64> { v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
    let strings = refs["strings"].as_array().unwrap();
    assert!(strings.len() >= 10);
    for case in strings {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(tok.encode(text, false).unwrap(), want, "tokenization of {text:?}");
        assert_eq!(tok.encode(text, true).unwrap(), want, "add_bos_token is false: no BOS for {text:?}");
        assert_eq!(tok.decode(&want), case["decoded"].as_str().unwrap(), "decoding of {text:?}");
    }
    let msgs: Vec<ChatMessage> = refs["chat_messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect();
    let prompt = tok.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(prompt, refs["chat_prompt"].as_str().unwrap());
    assert_eq!(tok.encode(&prompt, false).unwrap(), ids(&refs["chat_prompt_ids"]));
}

/// A chat template is code from the model's files: one that loops without end, writes without
/// bound or recurses without end fails within seconds with an error naming the tokenizer's file,
/// instead of hanging or filling memory; a real conversation still renders.
#[test]
fn a_hostile_chat_template_is_stopped() {
    let dir = fixture("tokenizer");
    let mut tok = Tokenizer::from_hf_dir(&dir).unwrap().unwrap();
    let msgs = vec![ChatMessage { role: "user".into(), content: "hi".into() }];
    let long: Vec<ChatMessage> = (0..200)
        .map(|i| ChatMessage { role: ["user", "assistant"][i % 2].into(), content: "word ".repeat(50) })
        .collect();
    assert!(tok.apply_chat_template(&long, true).unwrap().len() > 200 * 250, "a long conversation renders");
    for (template, why) in [
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
            "template instructions",
        ),
        ("{% for i in range(200) %}{{ 'a' * 100000000 }}{% endfor %}", "wrote more than 16 MiB"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
    ] {
        tok.chat_template = Some(template.into());
        let t0 = std::time::Instant::now();
        let e = tok.apply_chat_template(&msgs, true).unwrap_err().to_string();
        assert!(e.contains(&dir.display().to_string()) && e.contains(why), "{template}: {e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{template}: {:?}", t0.elapsed());
    }
}

/// A folder saved by transformers 5 has no `add_bos_token` in tokenizer_config.json and lets the
/// tokenizer.json's post-processor add BOS: prompts then start with BOS, as transformers'
/// `add_special_tokens=True` gives (they once lost it and tokenized one short); an explicit
/// `add_bos_token = false` still wins.
#[test]
fn a_post_processor_that_adds_bos_is_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tokenizer").join(f), dir.join(f)).unwrap();
    }
    let edit = |f: &str, e: &dyn Fn(&mut serde_json::Value)| {
        let p = dir.join(f);
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        e(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    };
    edit("tokenizer.json", &|v| {
        v["post_processor"] = serde_json::json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}
        });
    });
    let text = "Hello world, again.";
    let tok = Tokenizer::from_hf_dir(dir).unwrap().unwrap();
    let plain = tok.encode(text, false).unwrap();
    assert_eq!(tok.encode(text, true).unwrap(), plain, "add_bos_token = false in the config wins");
    edit("tokenizer_config.json", &|v| {
        v.as_object_mut().unwrap().remove("add_bos_token");
    });
    let tok = Tokenizer::from_hf_dir(dir).unwrap().unwrap();
    let with = tok.encode(text, true).unwrap();
    assert_eq!(with[0], 1, "{with:?}");
    assert_eq!(&with[1..], &plain[..]);
}
