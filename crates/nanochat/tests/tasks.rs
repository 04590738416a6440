//! The task datasets against the small data mirror (`tests/fixtures/mirror`) and, for their sizes,
//! the full offline mirror when `NANOCHAT_DATA_MIRROR` names it: every row read, the first examples of
//! each task in exactly the original's format, grading, generated tasks' consistency with the
//! calculator, and the combinators' determinism and coverage.

mod common;

use std::sync::{Arc, OnceLock};

use nanochat::calculator::calculate;
use nanochat::conversation::{render_conversation, Content, Conversation, Message, Part, PartKind, Role};
use nanochat::tasks::arc::{ArcSubset, ArcTask};
use nanochat::tasks::chat::ChatData;
use nanochat::tasks::gsm8k::{parse_answer, Gsm8k};
use nanochat::tasks::identity::Identity;
use nanochat::tasks::mixture::{Subset, TaskMixture, TaskSequence};
use nanochat::tasks::mmlu::Mmlu;
use nanochat::tasks::spelling::{load_words, SimpleSpelling, SpellingBee, Split};
use nanochat::tasks::*;

fn root() -> DataRoot {
    DataRoot::new(common::data())
}

fn tokenizer() -> &'static bpe::Tokenizer {
    static TOK: OnceLock<bpe::Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| common::tokenizer().unwrap())
}

fn words() -> Arc<[String]> {
    static WORDS: OnceLock<Arc<[String]>> = OnceLock::new();
    WORDS.get_or_init(|| load_words(&root()).unwrap()).clone()
}

fn sharegpt_train() -> &'static ChatData {
    static DATA: OnceLock<ChatData> = OnceLock::new();
    DATA.get_or_init(|| ChatData::load(&root(), "train").unwrap())
}

fn text(message: &Message) -> &str {
    match &message.content {
        Content::Text(t) => t,
        Content::Parts(_) => panic!("expected plain text"),
    }
}

fn parts(message: &Message) -> &[Part] {
    match &message.content {
        Content::Parts(p) => p,
        Content::Text(_) => panic!("expected parts"),
    }
}

fn part(kind: PartKind, text: &str) -> Part {
    Part { kind, text: text.to_string() }
}

/// Rows per file of a mirror: ARC (Easy validation, test; Challenge validation, test), MMLU (dev,
/// validation, test), GSM8K (train, test), chat data (train, test) and the word list.
struct Lengths {
    arc: [usize; 4],
    mmlu: [usize; 3],
    gsm8k: [usize; 2],
    chat: [usize; 2],
    words: usize,
}

/// Every row of each file is read (and no chat conversation skipped).
fn check_lengths(r: &DataRoot, want: Lengths) {
    let arc = |s, split| ArcTask::load(r, s, split).unwrap().len();
    assert_eq!(arc(ArcSubset::Easy, "validation"), want.arc[0]);
    assert_eq!(arc(ArcSubset::Easy, "test"), want.arc[1]);
    assert_eq!(arc(ArcSubset::Challenge, "validation"), want.arc[2]);
    assert_eq!(arc(ArcSubset::Challenge, "test"), want.arc[3]);
    assert_eq!(Mmlu::load(r, "dev").unwrap().len(), want.mmlu[0]);
    assert_eq!(Mmlu::load(r, "validation").unwrap().len(), want.mmlu[1]);
    assert_eq!(Mmlu::load(r, "test").unwrap().len(), want.mmlu[2]);
    assert_eq!(Gsm8k::load(r, "train").unwrap().len(), want.gsm8k[0]);
    assert_eq!(Gsm8k::load(r, "test").unwrap().len(), want.gsm8k[1]);
    for (split, n) in ["train", "test"].into_iter().zip(want.chat) {
        let chat = ChatData::load(r, split).unwrap();
        assert_eq!((chat.len(), chat.skipped()), (n, 0), "{split}");
    }
    let words = load_words(r).unwrap();
    assert_eq!(words.len(), want.words);
    assert!(words.iter().all(|w| !w.contains('\r') && !w.is_empty()));
}

#[test]
fn lengths_match_the_mirrors() {
    // tests/fixtures/README.md lists these; the word list keeps the original's CRLF line ends
    let small = Lengths { arc: [10, 60, 10, 10], mmlu: [10, 10, 10], gsm8k: [10, 10], chat: [60, 10], words: 2001 };
    check_lengths(&root(), small);
    if let Some(full) = common::full_mirror("lengths_match_the_mirrors") {
        // as the full mirror's README lists them
        let want = Lengths {
            arc: [570, 2376, 299, 1172],
            mmlu: [285, 1531, 14042],
            gsm8k: [7473, 1319],
            chat: [16422, 864],
            words: 370_099,
        };
        check_lengths(&DataRoot::new(full), want);
    }
}

#[test]
fn arc_first_example_is_in_the_original_format() {
    let task = ArcTask::load(&root(), ArcSubset::Easy, "validation").unwrap();
    assert_eq!(task.name(), "ARC-Easy-validation");
    assert_eq!(task.eval_type(), Some(EvalType::Categorical));
    let ex = task.get(0).unwrap();
    let m = &ex.conversation.messages;
    assert_eq!(m.len(), 2);
    assert_eq!((m[0].role, m[1].role), (Role::User, Role::Assistant));
    assert_eq!(
        text(&m[0]),
        "Multiple Choice question: Which technology was developed most recently?\n\
         - cellular telephone=A\n- television=B\n- refrigerator=C\n- airplane=D\n\n\
         Respond only with the letter of the correct answer."
    );
    assert_eq!(text(&m[1]), "A");
    let letters = ["A", "B", "C", "D"].map(String::from).to_vec();
    assert_eq!(ex.answer, Answer::Choice { letters, correct: "A".into() });
    assert!(task.evaluate(&ex, "A"));
    assert!(task.evaluate(&ex, " A\n"));
    assert!(!task.evaluate(&ex, "B"));

    // Through the tokenizer: only the answer letter and <|assistant_end|> are trained on.
    let tok = tokenizer();
    let (ids, mask) = render_conversation(tok, &ex.conversation, 4096).unwrap();
    let decoded = tok.decode(&ids);
    assert!(decoded.starts_with("<|bos|><|user_start|>Multiple Choice question: Which technology"));
    assert!(decoded.ends_with("answer.<|user_end|><|assistant_start|>A<|assistant_end|>"));
    let trained: Vec<u32> = ids.iter().zip(&mask).filter(|(_, &m)| m == 1).map(|(&id, _)| id).collect();
    assert_eq!(tok.decode(&trained), "A<|assistant_end|>");
}

#[test]
fn mmlu_first_example_is_in_the_original_format() {
    let task = Mmlu::load(&root(), "dev").unwrap();
    let ex = task.get(0).unwrap();
    let m = &ex.conversation.messages;
    assert_eq!(
        text(&m[0]),
        "Multiple Choice question: Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n\
         - 0=A\n- 1=B\n- 2=C\n- 3=D\n\nRespond only with the letter of the correct answer."
    );
    assert_eq!(text(&m[1]), "B");
    assert!(task.evaluate(&ex, "B") && !task.evaluate(&ex, "C"));
    assert!(Mmlu::load(&root(), "auxiliary_train").is_err());
}

#[test]
fn gsm8k_annotations_become_calculator_parts() {
    let task = Gsm8k::load(&root(), "train").unwrap();
    assert_eq!(task.eval_type(), Some(EvalType::Generative));
    let ex = task.get(0).unwrap();
    let m = &ex.conversation.messages;
    assert!(text(&m[0]).starts_with("Natalia sold clips to 48 of her friends in April"));
    assert_eq!(
        parts(&m[1]),
        [
            part(PartKind::Text, "Natalia sold 48/2 = "),
            part(PartKind::Python, "48/2"),
            part(PartKind::PythonOutput, "24"),
            part(PartKind::Text, "24 clips in May.\nNatalia sold 48+24 = "),
            part(PartKind::Python, "48+24"),
            part(PartKind::PythonOutput, "72"),
            part(PartKind::Text, "72 clips altogether in April and May.\n#### 72"),
        ]
    );
    assert_eq!(ex.answer, Answer::Final("72".into()));
    assert!(task.evaluate(&ex, "She sold 72 in all.\n#### 72"));
    assert!(!task.evaluate(&ex, "#### 73"));
    assert!(!task.evaluate(&ex, "72"));

    // The calculator's output is forced, not trained on; the expression is trained on.
    let tok = tokenizer();
    let (ids, mask) = render_conversation(tok, &ex.conversation, 4096).unwrap();
    let decoded = tok.decode(&ids);
    assert!(decoded.contains(
        "<|assistant_start|>Natalia sold 48/2 = <|python_start|>48/2<|python_end|><|output_start|>24<|output_end|>24 clips"
    ));
    let untrained_tail: Vec<u32> =
        ids.iter().zip(&mask).skip_while(|(_, &m)| m == 0).filter(|(_, &m)| m == 0).map(|(&id, _)| id).collect();
    assert_eq!(tok.decode(&untrained_tail), "<|output_start|>24<|output_end|><|output_start|>72<|output_end|>");

    // Every test answer has a final `#### N` to grade against.
    let test = Gsm8k::load(&root(), "test").unwrap();
    for i in 0..test.len() {
        assert!(matches!(test.get(i).unwrap().answer, Answer::Final(_)));
    }
}

#[test]
fn final_answers_with_commas_and_signs() {
    assert_eq!(extract_answer("so\n#### 1,234").as_deref(), Some("1234"));
    assert_eq!(extract_answer("#### -5").as_deref(), Some("-5"));
    assert_eq!(extract_answer("#### -1,000.50 dollars").as_deref(), Some("-1000.50"));
    assert_eq!(extract_answer("#### x\n#### 7").as_deref(), Some("7"));
    assert_eq!(extract_answer("#### -").as_deref(), None);
    assert_eq!(extract_answer("the answer is 7"), None);
    // An annotation without `=` gets an empty output; a `<<` that closes nothing stays text.
    assert_eq!(
        parse_answer("a <<5*3>>15 b <<-2+1=-1>> c << d\n#### -1"),
        [
            part(PartKind::Text, "a "),
            part(PartKind::Python, "5*3"),
            part(PartKind::PythonOutput, ""),
            part(PartKind::Text, "15 b "),
            part(PartKind::Python, "-2+1"),
            part(PartKind::PythonOutput, "-1"),
            part(PartKind::Text, " c << d\n#### -1"),
        ]
    );
    // Like the original's `<<[^>]+>>`, an annotation runs from the first `<<` to the first `>`.
    assert_eq!(parse_answer("<< x <<1+1=2>>"), [part(PartKind::Python, " x <<1+1"), part(PartKind::PythonOutput, "2")]);
}

#[test]
fn spelling_bee_answers_are_right_and_match_the_calculator() {
    let task = SpellingBee::new(words(), 200, Split::Train);
    let mut blocked = 0;
    for i in 0..task.len() {
        let ex = task.get(i).unwrap();
        let m = &ex.conversation.messages;
        let p = parts(&m[1]);
        assert_eq!(p.len(), 5);
        assert_eq!((p[2].kind, p[3].kind), (PartKind::Python, PartKind::PythonOutput));
        let expr = &p[2].text;
        let (word, letter) = expr.strip_prefix('\'').unwrap().split_once("'.count('").unwrap();
        let letter = letter.strip_suffix("')").unwrap();
        assert!(text(&m[0]).contains(word), "{}", text(&m[0]));
        let truth = word.matches(letter).count().to_string();
        assert_eq!(p[3].text, truth);
        match calculate(expr) {
            Some(out) => assert_eq!(out, p[3].text, "{expr}"),
            // The calculator refuses expressions holding words like "dir" or "open", as the original does.
            None => blocked += 1,
        }
        assert!(p[0].text.contains(&format!("{word}:")));
        assert_eq!(extract_answer(&p[4].text).as_deref(), Some(truth.as_str()));
        assert_eq!(ex.answer, Answer::Final(truth.clone()));
        assert!(task.evaluate(&ex, &format!("#### {truth}")));
    }
    assert!(blocked < 20, "{blocked} of 200 refused by the calculator");
    // Deterministic, and the splits differ.
    assert_eq!(task.get(7).unwrap(), SpellingBee::new(words(), 200, Split::Train).get(7).unwrap());
    assert_ne!(task.get(7).unwrap(), SpellingBee::new(words(), 200, Split::Test).get(7).unwrap());
    assert!(task.get(200).is_err());
}

#[test]
fn simple_spelling_spells() {
    let task = SimpleSpelling::new(words(), 50, Split::Test);
    for i in 0..task.len() {
        let ex = task.get(i).unwrap();
        let m = &ex.conversation.messages;
        let word = text(&m[0]).strip_prefix("Spell the word: ").unwrap();
        let letters: Vec<String> = word.chars().map(String::from).collect();
        assert_eq!(text(&m[1]), format!("{word}:{}", letters.join(",")));
    }
}

#[test]
fn identity_conversations_are_deterministic_and_on_topic() {
    let task = Identity::new(100, 7);
    let mut differs = false;
    let mut all = String::new();
    for i in 0..task.len() {
        let ex = task.get(i).unwrap();
        assert_eq!(ex, Identity::new(100, 7).get(i).unwrap());
        differs |= ex != Identity::new(100, 8).get(i).unwrap();
        all.extend(ex.conversation.messages.iter().map(text));
    }
    assert!(differs);
    for fact in ["I'm nanochat", "Rust", "Karpathy", "trained by the person running me", "make mistakes"] {
        assert!(all.contains(fact), "no conversation says {fact:?}");
    }
}

#[test]
fn every_task_renders() {
    let r = root();
    let tasks: Vec<Arc<dyn Task>> = vec![
        Arc::new(ArcTask::load(&r, ArcSubset::Challenge, "test").unwrap()),
        Arc::new(Mmlu::load(&r, "validation").unwrap()),
        Arc::new(Gsm8k::load(&r, "test").unwrap()),
        Arc::new(ChatData::load(&r, "test").unwrap()),
        Arc::new(SpellingBee::new(words(), 1000, Split::Test)),
        Arc::new(SimpleSpelling::new(words(), 1000, Split::Train)),
        Arc::new(Identity::new(1000, 0)),
    ];
    let tok = tokenizer();
    for task in tasks {
        let stride = (task.len() / 150).max(1);
        for i in (0..task.len()).step_by(stride) {
            let ex = task.get(i).unwrap();
            let (ids, mask) = render_conversation(tok, &ex.conversation, 1 << 20)
                .unwrap_or_else(|e| panic!("{} example {i}: {e}", task.name()));
            assert_eq!(ids.len(), mask.len());
            assert!(mask.contains(&1), "{} example {i} trains on nothing", task.name());
        }
    }
    // The big training split only through a sample: it is parsed once, shared with other tests.
    let train = sharegpt_train();
    for i in (0..train.len()).step_by(97) {
        render_conversation(tok, &train.get(i).unwrap().conversation, 1 << 20).unwrap();
    }
}

#[test]
fn custom_json_loads_both_shapes_and_reports_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("identity.jsonl");
    std::fs::write(
        &good,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n\
         \n\
         [{\"role\": \"system\", \"content\": \"be brief\"}, {\"role\": \"user\", \"content\": \"who?\"}, \
         {\"role\": \"assistant\", \"content\": [{\"type\": \"text\", \"text\": \"me\"}]}]\n",
    )
    .unwrap();
    let task = ChatData::custom_json(&good).unwrap();
    assert_eq!(task.len(), 2);
    assert_eq!(task.get(1).unwrap().conversation.messages[0].role, Role::System);
    render_conversation(tokenizer(), &task.get(1).unwrap().conversation, 100).unwrap();

    let cases = [
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}", "not valid JSON"),
        ("{\"messages\": [{\"role\": \"bot\", \"content\": \"hi\"}]}", "bot"),
        ("[{\"role\": \"assistant\", \"content\": \"hi\"}, {\"role\": \"user\", \"content\": \"x\"}]", "alternate"),
        ("[{\"role\": \"user\", \"content\": \"hi\"}]", "at least"),
        ("42", "object or array"),
    ];
    for (line, reason) in cases {
        let bad = dir.path().join("bad.jsonl");
        let ok = "[{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]";
        std::fs::write(&bad, format!("{ok}\n{line}\n")).unwrap();
        let err = format!("{:#}", ChatData::custom_json(&bad).err().unwrap());
        assert!(err.contains("bad.jsonl line 2") && err.contains(reason), "{err}");
    }
}

#[test]
fn chat_data_skips_malformed_conversations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.jsonl");
    let good =
        r#"{"id": "x", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;
    let lines = [
        good,
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}"#,
        r#"{"messages": []}"#,
        "not json",
        r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#,
    ];
    std::fs::write(&path, lines.join("\n")).unwrap();
    let data = ChatData::from_file(&path, "chat").unwrap();
    assert_eq!((data.len(), data.skipped()), (2, 3));
    assert_eq!(data.get(1).unwrap().conversation.messages.len(), 3);
}

/// A toy task whose examples say where they come from, to check the combinators.
struct Numbers(&'static str, usize);

impl Task for Numbers {
    fn name(&self) -> String {
        self.0.to_string()
    }
    fn len(&self) -> usize {
        self.1
    }
    fn get(&self, index: usize) -> anyhow::Result<Example> {
        anyhow::ensure!(index < self.1, "out of range");
        let conversation = Conversation {
            messages: vec![Message::new(Role::User, format!("{}:{index}", self.0)), Message::new(Role::Assistant, "")],
        };
        Ok(Example { conversation, answer: Answer::None })
    }
    fn eval_type(&self) -> Option<EvalType> {
        None
    }
}

fn labels(task: &dyn Task) -> Vec<String> {
    (0..task.len()).map(|i| text(&task.get(i).unwrap().conversation.messages[0]).to_string()).collect()
}

#[test]
fn mixture_is_deterministic_complete_and_interleaved() {
    let a: Arc<dyn Task> = Arc::new(Numbers("a", 300));
    let b: Arc<dyn Task> = Arc::new(Numbers("b", 100));
    let mix = TaskMixture::new(vec![a.clone(), b.clone(), b.clone()], 42);
    assert_eq!(mix.len(), 500);
    let order = labels(&mix);
    assert_eq!(order, labels(&TaskMixture::new(vec![a.clone(), b.clone(), b.clone()], 42)));
    assert_ne!(order, labels(&TaskMixture::new(vec![a.clone(), b.clone(), b.clone()], 43)));
    // Every example once, the twice-listed task twice.
    let mut sorted = order.clone();
    sorted.sort();
    let mut expected: Vec<String> =
        labels(a.as_ref()).into_iter().chain(labels(b.as_ref())).chain(labels(b.as_ref())).collect();
    expected.sort();
    assert_eq!(sorted, expected);
    // Interleaved: the first fifth already holds a fair share of b.
    let early_b = order[..100].iter().filter(|l| l.starts_with('b')).count();
    assert!((20..=60).contains(&early_b), "{early_b}");
    assert!(mix.get(500).is_err());
}

#[test]
fn sequence_concatenates() {
    let seq = TaskSequence::new(vec![Arc::new(Numbers("a", 2)), Arc::new(Numbers("e", 0)), Arc::new(Numbers("b", 3))]);
    assert_eq!(labels(&seq), ["a:0", "a:1", "b:0", "b:1", "b:2"]);
    assert!(seq.get(5).is_err());
    assert_eq!(seq.eval_type(), None);
}

#[test]
fn slices_and_shuffles() {
    let a: Arc<dyn Task> = Arc::new(Numbers("a", 25));
    let s = Subset::slice(a.clone(), 10, Some(20), 3).unwrap();
    assert_eq!(labels(&s), ["a:10", "a:13", "a:16", "a:19"]);
    assert_eq!(Subset::slice(a.clone(), 20, None, 1).unwrap().len(), 5);
    assert_eq!(Subset::slice(a.clone(), 30, Some(40), 1).unwrap().len(), 0);
    assert!(Subset::slice(a.clone(), 0, None, 0).is_err());

    let shuffled = labels(&Subset::shuffled(a.clone(), 1));
    assert_eq!(shuffled, labels(&Subset::shuffled(a.clone(), 1)));
    assert_ne!(shuffled, labels(a.as_ref()));
    let mut sorted = shuffled.clone();
    sorted.sort();
    let mut original = labels(a.as_ref());
    original.sort();
    assert_eq!(sorted, original);

    // Real tasks keep their grading through a subset.
    let arc: Arc<dyn Task> = Arc::new(ArcTask::load(&root(), ArcSubset::Easy, "validation").unwrap());
    let sub = Subset::shuffled(arc.clone(), 5);
    assert_eq!(sub.eval_type(), Some(EvalType::Categorical));
    assert_eq!(sub.len(), 10);
}

#[test]
fn missing_data_says_where_to_point() {
    let err = format!("{:#}", Gsm8k::load(&DataRoot::new("/nonexistent/task_data"), "train").err().unwrap());
    assert!(err.contains("/nonexistent/task_data/eval/gsm8k/train.jsonl") && err.contains("--data-dir"), "{err}");
    assert!(Gsm8k::load(&root(), "validation").is_err());
    assert!(DataRoot::default_dir().ends_with("task_data"));
}
