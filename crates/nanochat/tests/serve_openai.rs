//! The OpenAI-compatible API through the official `openai` Python client (tests/serve/
//! openai_features.py runs the calls; skipped when the package is missing unless
//! NANOCHAT_REQUIRE_OPENAI is set), every feature streamed and not, against answers computed here
//! from the engine itself ([`oracle`]). The models are built in the test ([`fixture`]): no files.

#[path = "serve/fixture.rs"]
mod fixture;
#[path = "serve/oracle.rs"]
mod oracle;

use anyhow::{Context, Result};
use fixture::{random_engine, scripted_engine, Say};
use nanochat::engine::{Engine, GenerateOptions, Penalties};
use oracle::{chat_prompt, config, expect, has_openai_client, run_plan, serve, Choice};
use serde_json::{json, Value};

/// Checks a chat result (either form) against the expected choices.
fn check_chat(name: &str, seen: &Value, want: &[Choice]) {
    assert!(seen.get("error").is_none(), "{name}: {seen}");
    let choices = seen["choices"].as_array().unwrap_or_else(|| panic!("{name}: no choices in {seen}"));
    assert_eq!(choices.len(), want.len(), "{name}: {seen}");
    for (i, (got, want)) in choices.iter().zip(want).enumerate() {
        assert_eq!(got["index"], i, "{name}");
        assert_eq!(got["content"], want.content.as_str(), "{name}: choice {i}");
        assert_eq!(got["finish_reason"], want.finish, "{name}: choice {i}");
        assert!(!want.content.contains("<|"), "{name}: a special token leaked");
    }
    let total: usize = want.iter().map(|c| c.tokens).sum();
    if !seen["usage"].is_null() {
        assert_eq!(seen["usage"]["completion_tokens"], total, "{name}: {}", seen["usage"]);
    }
}

/// The same request, whole and streamed (with usage).
fn both(args: Value) -> [Value; 2] {
    let mut streamed = args.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    [json!({"call": "chat", "args": args}), json!({"call": "chat", "args": streamed})]
}

/// Text of each token of a greedy reply.
fn greedy_pieces(engine: &Engine, prompt: &[u32], max_tokens: usize) -> Result<Vec<String>> {
    let opts = GenerateOptions { max_tokens, temperature: 0.0, ..Default::default() };
    let mut text = nanochat::serve::transcript::ReplyText::new(engine);
    let mut pieces = Vec::new();
    for step in engine.generate(prompt, &opts)? {
        let token = step?.0[0];
        if engine.specials().is_stop(token) {
            break;
        }
        pieces.push(text.push(token));
    }
    Ok(pieces)
}

#[test]
fn sampling_stopping_choices_and_logprobs_through_the_official_client() -> Result<()> {
    if !has_openai_client() {
        return Ok(());
    }
    let engine = random_engine(7);
    let question = "Tell me a story about the blue sky";
    let prompt = chat_prompt(&engine, question);
    let messages = json!([{"role": "user", "content": question}]);
    let base = json!({"model": "nanochat-test", "messages": messages, "max_tokens": 16, "temperature": 0});

    // a stop string that starts in one token and ends in the next, found nowhere earlier
    let pieces = greedy_pieces(&engine, &prompt, 16)?;
    let text = pieces.concat();
    let mut split = None;
    let mut start = 0;
    for pair in pieces.windows(2) {
        start += pair[0].len();
        let (Some(a), Some(b)) = (pair[0].chars().last(), pair[1].chars().next()) else { continue };
        let stop = format!("{a}{b}");
        if pair[0].len() > 1 && text.find(&stop) == Some(start - a.len_utf8()) {
            split = Some(stop);
            break;
        }
    }
    let split = split.context("no stop string straddles two tokens of the greedy reply")?;
    let first = pieces[0].chars().next().context("an empty first token")?.to_string();

    let greedy = |max_tokens: usize| GenerateOptions { max_tokens, temperature: 0.0, ..Default::default() };
    let sampled = |seed: u64| GenerateOptions { max_tokens: 16, temperature: 1.0, seed, ..Default::default() };
    let with = |extra: Value| {
        let mut args = base.clone();
        if let (Some(args), Some(extra)) = (args.as_object_mut(), extra.as_object()) {
            args.extend(extra.clone());
        }
        args
    };
    let cases: Vec<(&str, Value, Vec<Choice>)> = vec![
        ("split stop", with(json!({"stop": split})), expect(&engine, &prompt, &greedy(16), &[&split])?),
        ("stop list", with(json!({"stop": ["never-there", split]})), expect(&engine, &prompt, &greedy(16), &[&split])?),
        ("first-token stop", with(json!({"stop": first})), expect(&engine, &prompt, &greedy(16), &[&first])?),
        (
            "max_completion_tokens",
            with(json!({"max_completion_tokens": 5})),
            expect(&engine, &prompt, &greedy(5), &[])?,
        ),
        (
            "top_p",
            with(json!({"temperature": 1, "top_p": 0.6, "seed": 11, "extra_body": {"top_k": 0}})),
            expect(&engine, &prompt, &GenerateOptions { top_p: 0.6, top_k: Some(0), ..sampled(11) }, &[])?,
        ),
        (
            "top_p with top_k and temperature",
            with(json!({"temperature": 0.7, "top_p": 0.9, "seed": 12, "extra_body": {"top_k": 5}})),
            expect(
                &engine,
                &prompt,
                &GenerateOptions { temperature: 0.7, top_p: 0.9, top_k: Some(5), ..sampled(12) },
                &[],
            )?,
        ),
        (
            "seed",
            with(json!({"temperature": 1, "seed": 13})),
            expect(&engine, &prompt, &GenerateOptions { top_k: Some(50), ..sampled(13) }, &[])?,
        ),
        (
            "penalties",
            with(json!({"frequency_penalty": 1.5, "presence_penalty": 0.5})),
            expect(
                &engine,
                &prompt,
                &GenerateOptions { penalties: Penalties { frequency: 1.5, presence: 0.5 }, ..greedy(16) },
                &[],
            )?,
        ),
        (
            "n",
            with(json!({"temperature": 1, "seed": 21, "n": 3})),
            expect(&engine, &prompt, &GenerateOptions { num_samples: 3, top_k: Some(50), ..sampled(21) }, &[])?,
        ),
    ];
    assert_eq!(cases[2].2[0].content, "", "the first-token stop returns nothing");
    assert!(cases[0].2[0].content.len() < text.len() && cases[0].2[0].finish == "stop");
    let plan: Vec<Value> = cases.iter().flat_map(|(_, args, _)| both(args.clone())).collect();
    // the same seed twice gives the same reply
    let mut plan = plan;
    plan.extend(both(with(json!({"temperature": 1, "seed": 13}))));
    let logprobs_args = with(json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 6}));
    plan.extend(both(logprobs_args));

    let server = serve(engine, config())?;
    let seen = run_plan(&server, &json!(plan))?;
    server.shutdown()?;
    for (i, (name, _, want)) in cases.iter().enumerate() {
        check_chat(&format!("{name} (whole)"), &seen[2 * i], want);
        check_chat(&format!("{name} (streamed)"), &seen[2 * i + 1], want);
        assert!(seen[2 * i]["choices"].as_array().is_some_and(|c| c.iter().all(|c| c["logprobs"].is_null())));
        assert_eq!(seen[2 * i + 1]["objects"], json!(["chat.completion.chunk"]), "{name}");
        for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            assert_eq!(seen[2 * i + 1]["usage"][field], seen[2 * i]["usage"][field], "{name}: streamed {field}");
        }
    }
    let seed = cases.iter().position(|c| c.0 == "seed").context("the seed case")?;
    let again = 2 * cases.len();
    assert_eq!(seen[again]["choices"], seen[2 * seed]["choices"], "the same seed gave another reply");
    assert_eq!(seen[again + 1]["choices"], seen[2 * seed + 1]["choices"]);
    let n = &seen[2 * cases.iter().position(|c| c.0 == "n").context("the n case")?];
    assert!(n["choices"][0]["content"] != n["choices"][1]["content"], "3 samples at temperature 1 were the same");

    // logprobs: one entry per token, the model's log-softmax, the greedy token first among 3
    let want = expect(&random_engine(7), &prompt, &GenerateOptions { logprobs: Some(3), ..greedy(6) }, &[])?;
    for seen in &seen[again + 2..again + 4] {
        let choice = &seen["choices"][0];
        assert_eq!(choice["content"], want[0].content.as_str());
        let entries = choice["logprobs"].as_array().context("no logprobs")?;
        assert_eq!(entries.len(), want[0].logprobs.len(), "{choice}");
        let mut bytes = Vec::new();
        for (entry, lp) in entries.iter().zip(&want[0].logprobs) {
            let logprob = entry["logprob"].as_f64().context("a logprob")?;
            assert!((logprob - lp.logprob as f64).abs() < 1e-4, "{logprob} vs {}", lp.logprob);
            assert_eq!(entry["top"].as_array().map(Vec::len), Some(3));
            assert_eq!(entry["top"][0][0], entry["token"], "greedy picks the most likely token");
            bytes.extend(entry["bytes"].as_array().context("bytes")?.iter().filter_map(Value::as_u64).map(|b| b as u8));
        }
        // bytes that are no character read as U+FFFD in content, as a lossy decoding gives
        assert_eq!(String::from_utf8_lossy(&bytes), want[0].content);
    }
    Ok(())
}

#[test]
fn text_completions_and_models_through_the_official_client() -> Result<()> {
    if !has_openai_client() {
        return Ok(());
    }
    let engine = random_engine(8);
    let text = "The model reads the";
    let tok = engine.tokenizer();
    let prompt = [vec![tok.bos_id()], tok.encode(text)].concat();
    let greedy = GenerateOptions { max_tokens: 12, temperature: 0.0, logprobs: Some(2), ..Default::default() };
    let want = expect(&engine, &prompt, &greedy, &[])?;
    let two = expect(
        &engine,
        &prompt,
        &GenerateOptions { num_samples: 2, temperature: 1.0, seed: 5, top_k: Some(50), ..greedy.clone() },
        &[],
    )?;
    let args = json!({"model": "nanochat-test", "prompt": text, "max_tokens": 12, "temperature": 0});
    let mut streamed = args.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let mut logprobs = args.clone();
    logprobs["logprobs"] = json!(2);
    let mut logprobs_streamed = streamed.clone();
    logprobs_streamed["logprobs"] = json!(2);
    let mut echo = args.clone();
    echo["echo"] = json!(true);
    let mut n = args.clone();
    n["n"] = json!(2);
    n["temperature"] = json!(1);
    n["seed"] = json!(5);
    let mut ids = args.clone();
    ids["prompt"] = json!(prompt);
    let plan = json!([
        {"call": "completion", "args": args},
        {"call": "completion", "args": streamed},
        {"call": "completion", "args": logprobs},
        {"call": "completion", "args": logprobs_streamed},
        {"call": "completion", "args": echo},
        {"call": "completion", "args": n},
        {"call": "completion", "args": ids},
        {"call": "models"},
        {"call": "retrieve", "args": {"model": "nanochat-test"}},
        {"call": "retrieve", "args": {"model": "gpt-4o"}},
        {"call": "completion", "args": {"model": "x", "prompt": ["one", "two"]}},
    ]);
    let server = serve(engine, config())?;
    let seen = run_plan(&server, &plan)?;
    server.shutdown()?;
    for (i, seen) in seen[..4].iter().chain(&seen[6..7]).enumerate() {
        let choice = &seen["choices"][0];
        assert_eq!(choice["text"], want[0].content.as_str(), "call {i}: {seen}");
        assert_eq!(choice["finish_reason"], want[0].finish);
        assert_eq!(seen["usage"]["prompt_tokens"], prompt.len());
        assert_eq!(seen["usage"]["completion_tokens"], want[0].tokens);
    }
    assert_eq!(seen[0]["object"], "text_completion");
    for seen in &seen[2..4] {
        let lp = &seen["choices"][0]["logprobs"];
        let tokens = lp["tokens"].as_array().context("tokens")?;
        assert_eq!(tokens.len(), want[0].tokens, "{lp}");
        let offsets: Vec<usize> = lp["text_offset"]
            .as_array()
            .context("offsets")?
            .iter()
            .filter_map(Value::as_u64)
            .map(|o| o as usize)
            .collect();
        assert_eq!(offsets, want[0].offsets);
        for (got, want) in lp["token_logprobs"].as_array().context("logprobs")?.iter().zip(&want[0].logprobs) {
            assert!((got.as_f64().unwrap_or(0.0) - want.logprob as f64).abs() < 1e-4);
        }
        assert!(lp["top_logprobs"]
            .as_array()
            .is_some_and(|t| t.iter().all(|m| m.as_object().is_some_and(|m| !m.is_empty() && m.len() <= 2))));
    }
    assert_eq!(seen[4]["choices"][0]["text"], format!("{text}{}", want[0].content));
    let texts: Vec<&str> =
        seen[5]["choices"].as_array().context("choices")?.iter().map(|c| c["text"].as_str().unwrap_or("?")).collect();
    assert_eq!(texts, two.iter().map(|c| c.content.as_str()).collect::<Vec<_>>());
    assert_eq!(seen[7]["ids"], json!(["nanochat-test"]));
    assert_eq!(seen[8]["id"], "nanochat-test");
    assert_eq!(seen[9]["error"]["class"], "NotFoundError");
    assert_eq!(seen[9]["error"]["body"]["code"], "model_not_found");
    assert_eq!(seen[10]["error"]["class"], "BadRequestError");
    assert_eq!(seen[10]["error"]["body"]["param"], "prompt");
    Ok(())
}

/// The scripted model's reply: a calculator call inside it.
fn calculator_engine() -> Engine {
    scripted_engine(&[
        Say::Text("The sum is"),
        Say::Special("<|python_start|>"),
        Say::Text("12+34"),
        Say::Special("<|python_end|>"),
        Say::Text("!"),
    ])
}

#[test]
fn the_calculator_shows_as_text_and_conversations_come_back_as_the_model_wrote_them() -> Result<()> {
    if !has_openai_client() {
        return Ok(());
    }
    let engine = calculator_engine();
    let reply = "The sum is<<12+34=46>>!";
    let question = json!({"role": "user", "content": "What is 12+34?"});
    let prompt = chat_prompt(&engine, "What is 12+34?");
    let want =
        expect(&engine, &prompt, &GenerateOptions { max_tokens: 64, temperature: 0.0, ..Default::default() }, &[])?;
    assert_eq!(want[0].content, reply, "the script");
    // the second turn re-reads the first: all of it comes from the prompt cache
    let thanks = json!({"role": "user", "content": "Thanks"});
    let turn2 = vec![question.clone(), json!({"role": "assistant", "content": reply}), thanks.clone()];
    let tool_form = vec![
        question.clone(),
        json!({"role": "assistant", "content": "The sum is", "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "calculator", "arguments": "{\"expression\": \"12+34\"}"}}]}),
        json!({"role": "tool", "tool_call_id": "call_1", "content": "46"}),
        json!({"role": "assistant", "content": "!"}),
        thanks,
    ];
    let tok = engine.tokenizer();
    let turn2_tokens = prompt.len() + want[0].ids.len() + tok.encode("Thanks").len() + 3;
    let cached = prompt.len() + want[0].ids.len() - 1;
    // ending on the tool's result continues the assistant's turn after the calculator
    let open = &tool_form[..3];
    let args = |messages: &[Value]| json!({"model": "m", "messages": messages, "max_tokens": 64, "temperature": 0});
    let mut plan: Vec<Value> = both(args(&[question])).to_vec();
    plan.extend(both(args(&turn2)));
    plan.extend(both(args(&tool_form)));
    plan.extend(both(args(open)));
    let server = serve(engine, config())?;
    let seen = run_plan(&server, &json!(plan))?;
    server.shutdown()?;
    for seen in &seen[..2] {
        assert_eq!(seen["choices"][0]["content"], reply, "{seen}");
    }
    for (i, seen) in seen[2..6].iter().enumerate() {
        assert_eq!(seen["usage"]["prompt_tokens"], turn2_tokens, "{seen}");
        // the first asks after turn 1 only; the others find turn 2 itself cached (all but the last
        // prompt token, which is prefilled for the logits)
        let want = if i == 0 { cached } else { turn2_tokens - 1 };
        assert_eq!(seen["usage"]["cached_tokens"], want, "{seen}");
        assert_eq!(seen["choices"][0]["content"], reply);
    }
    for seen in &seen[6..] {
        assert_eq!(seen["choices"][0]["content"], "!", "{seen}");
    }
    Ok(())
}
