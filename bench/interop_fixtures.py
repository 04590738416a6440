"""Fixtures for `nanochat import` / `export` (crates/nanochat/tests/fixtures/interop/), made by running the
original nanochat and Hugging Face transformers, so that the Rust tests compare against them and not against
themselves.

    git --git-dir=MIRROR archive 3a5e0bc | tar -x -C /tmp/nanochat-v0      # the original, v0
    git --git-dir=MIRROR archive 92d63d4 | tar -x -C /tmp/nanochat-head    # the original, HEAD
    /work/venv-ref/bin/python bench/interop_fixtures.py --v0 /tmp/nanochat-v0 --head /tmp/nanochat-head \
        --out crates/nanochat/tests/fixtures/interop

What it writes (everything small: a 2-layer model of width 32 and a 384-token vocabulary):
- `original/tokenizer/`: v0's `RustBPETokenizer.train_from_iterator` on this repo's tok_eval texts and README,
  saved by v0's own `save` (`tokenizer.pkl`, a pickled tiktoken Encoding) and `token_bytes.pt` as v0's
  `tok_train.py` computes it.
- `original/base_checkpoints/d2/`: a v0 `GPT` (n_layer 2, n_head 4, n_kv_head 2 (GQA), n_embd 32) with every
  weight random (v0's init zeroes lm_head and the c_proj's, which would hide mapping mistakes), saved by v0's
  `save_checkpoint` as `base_train.py` calls it: `model_000010.pt` (v0 keeps `transformer.wte` in bfloat16,
  the rest float32) and `meta_000010.json`.
- `original/compiled/`: the same weights, all bfloat16, under torch.compile's `_orig_mod.` prefix.
- `original/expected.safetensors` + `original/expected.json`: v0's logits (`GPT.forward`, float32 on CPU with
  the bf16 embedding widened, as v0 runs it under autocast) for each prompt, and v0's greedy tokens
  (`GPT.generate`, temperature 0); the prompts' ids by v0's tokenizer, the ids of encode cases and v0's
  `render_conversation` / `render_for_completion` of a few conversations.
- `hf/`: the same weights as a transformers `NanoChatForCausalLM` (float32, transformers' default config
  values where nanochat has none, e.g. rms_norm_eps 1e-6) saved by `save_pretrained`, with the tokenizer
  converted by transformers' own tiktoken converter (as its nanochat conversion script does: `tokenizer.json`), plus
  `expected.safetensors` / `expected.json`: transformers' logits and greedy tokens for the same prompts.
- `head/base_checkpoints/d2/`: a checkpoint of the original at HEAD (value embeddings, sliding windows, smear,
  backout, per-layer lambdas), saved by its own `save_checkpoint`: the import must refuse it.
- `hostile/`: `torch.save` of objects whose unpickling would call `posix.system` (a model file and a
  tokenizer.pkl): the import must refuse them without running anything.
"""

import argparse
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
VOCAB = 384
CONFIG = dict(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
STEP = 10
GREEDY_TOKENS = 12
PROMPTS = [
    "The capital of France is",
    "Hello world! 123 + 4567 = ",
    "Unicode: 你好 🌍\tand\nnew",
]
ENCODE_CASES = [
    "",
    "hello",
    "Hello world! This is a test.",
    "Numbers: 123, 4567, 89",
    "Contractions: I'm, you're, it's",
    "Special chars: @#$%^&*()",
    "Unicode: 你好世界 🌍",
    "  leading and trailing spaces  ",
    "<|bos|> is not special inside text",
    "line one\nline two\r\n\r\n\ttabbed",
    "ÀÉÎÕÜ àéîõü ßçñ",
]
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "Hello again."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Compute 12*34"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me compute. "},
                    {"type": "python", "text": "12*34"},
                    {"type": "python_output", "text": "408"},
                    {"type": "text", "text": "It is 408."},
                ],
            },
        ]
    },
]


def import_original(src):
    """Imports the `nanochat` package from `src` (dropping any other copy already imported)."""
    for name in list(sys.modules):
        if name == "nanochat" or name.startswith("nanochat."):
            del sys.modules[name]
    sys.path.insert(0, str(src))
    import nanochat.checkpoint_manager as checkpoint_manager
    import nanochat.gpt as gpt
    import nanochat.tokenizer as tokenizer

    sys.path.remove(str(src))
    return gpt, tokenizer, checkpoint_manager


def randomize(model, seed):
    """Every weight random: embedding N(0, 1), linears N(0, 1/fan_in), in each parameter's dtype."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 1.0 if name == "transformer.wte.weight" else p.shape[1] ** -0.5
            p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))


def save_tensors(path, tensors):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def write_json(path, value):
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def make_original(v0, out):
    gpt, tok, ckpt = import_original(v0)
    # the tokenizer, trained and saved by v0's own code
    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "crates/nanochat/src/tok_eval").glob("*.txt"))]
    texts.append((REPO / "README.md").read_text(encoding="utf-8"))
    tokenizer = tok.RustBPETokenizer.train_from_iterator(iter(texts), VOCAB)
    tok_dir = out / "original" / "tokenizer"
    tokenizer.save(str(tok_dir))
    # token_bytes.pt exactly as v0's scripts/tok_train.py computes it
    specials = set(tokenizer.get_special_tokens())
    token_bytes = []
    for token_id in range(tokenizer.get_vocab_size()):
        s = tokenizer.decode([token_id])
        token_bytes.append(0 if s in specials else len(s.encode("utf-8")))
    with open(tok_dir / "token_bytes.pt", "wb") as f:
        torch.save(torch.tensor(token_bytes, dtype=torch.int32, device="cpu"), f)

    # the model, v0's GPT (its __init__ keeps wte in bfloat16, as on the GPU)
    config = gpt.GPTConfig(**CONFIG)
    model = gpt.GPT(config)
    model.init_weights()
    randomize(model, 1234)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    ckpt_dir = out / "original" / "base_checkpoints" / "d2"
    meta = {
        "step": STEP,
        "val_bpb": 4.2,
        "model_config": CONFIG,
        "user_config": {"depth": 2, "note": "fixture for nanochat-rs import tests"},
        "device_batch_size": 4,
        "max_seq_len": CONFIG["sequence_len"],
    }
    ckpt.save_checkpoint(str(ckpt_dir), STEP, model.state_dict(), None, meta)

    # the same weights, all bf16, under torch.compile's prefix
    compiled = out / "original" / "compiled"
    compiled.mkdir(parents=True, exist_ok=True)
    state = {"_orig_mod." + k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save(state, compiled / f"model_{STEP:06d}.pt")
    write_json(compiled / f"meta_{STEP:06d}.json", meta)

    # v0's outputs. On the GPU v0 runs under bf16 autocast; on the CPU the bf16 embedding must be
    # widened to float32 to run at all (its values are unchanged), and everything is float32 then.
    model.transformer.wte.to(dtype=torch.float32)
    model.eval()
    bos = tokenizer.get_bos_token_id()
    logits, cases = {}, []
    for i, text in enumerate(PROMPTS):
        ids = tokenizer.encode(text, prepend=bos)
        with torch.no_grad():
            logits[f"logits.{i}"] = model(torch.tensor([ids]))[0].float()
        greedy = list(model.generate(ids, GREEDY_TOKENS, temperature=0))
        cases.append({"text": text, "ids": ids, "greedy": greedy})
    save_tensors(out / "original" / "expected.safetensors", logits)
    conversations = []
    for conv in CONVERSATIONS:
        ids, mask = tokenizer.render_conversation(conv)
        completion = tokenizer.render_for_completion(conv)
        conversations.append({"conversation": conv, "ids": ids, "mask": mask, "completion": completion})
    expected = {
        "prompts": cases,
        "encode": [{"text": t, "ids": tokenizer.encode(t)} for t in ENCODE_CASES],
        "conversations": conversations,
        "vocab_size": tokenizer.get_vocab_size(),
        "bos_id": bos,
    }
    write_json(out / "original" / "expected.json", expected)
    return model, tokenizer


def make_hf(model, tokenizer, out):
    from transformers import NanoChatConfig, NanoChatForCausalLM
    from transformers.convert_slow_tokenizer import TikTokenConverter

    hf_dir = out / "hf" / "model"
    c = CONFIG
    config = NanoChatConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["n_embd"],
        intermediate_size=4 * c["n_embd"],
        num_hidden_layers=c["n_layer"],
        num_attention_heads=c["n_head"],
        num_key_value_heads=c["n_kv_head"],
        max_position_embeddings=c["sequence_len"],
        bos_token_id=tokenizer.get_bos_token_id(),
        eos_token_id=tokenizer.encode_special("<|assistant_end|>"),
        pad_token_id=tokenizer.get_bos_token_id(),
    )
    hf = NanoChatForCausalLM(config)
    # transformers' own names for the original's (its conversion script's table)
    state = {"model.embed_tokens.weight": model.transformer.wte.weight, "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.transformer.h):
        p = f"model.layers.{i}"
        state[f"{p}.self_attn.q_proj.weight"] = block.attn.c_q.weight
        state[f"{p}.self_attn.k_proj.weight"] = block.attn.c_k.weight
        state[f"{p}.self_attn.v_proj.weight"] = block.attn.c_v.weight
        state[f"{p}.self_attn.o_proj.weight"] = block.attn.c_proj.weight
        state[f"{p}.mlp.fc1.weight"] = block.mlp.c_fc.weight
        state[f"{p}.mlp.fc2.weight"] = block.mlp.c_proj.weight
    hf.load_state_dict({k: v.detach().float().clone() for k, v in state.items()}, strict=True)
    hf.eval()
    hf.save_pretrained(str(hf_dir))
    # transformers' tiktoken converter, as its nanochat conversion script runs it (convert_tiktoken_to_fast),
    # handed the ranks directly instead of through a file (which would need `blobfile`)
    enc = tokenizer.enc
    converter = TikTokenConverter(vocab_file=None, pattern=enc._pat_str, extra_special_tokens=enc._special_tokens)
    converter.load_tiktoken_bpe = lambda _path: dict(enc._mergeable_ranks)
    converter.converted().save(str(hf_dir / "tokenizer.json"))

    logits, cases = {}, []
    for i, text in enumerate(PROMPTS):
        ids = tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())
        with torch.no_grad():
            logits[f"logits.{i}"] = hf(torch.tensor([ids])).logits[0].float()
            seq = list(ids)
            for _ in range(GREEDY_TOKENS):
                seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
        cases.append({"text": text, "ids": ids, "greedy": seq[len(ids) :]})
    save_tensors(out / "hf" / "expected.safetensors", logits)
    write_json(out / "hf" / "expected.json", {"prompts": cases})


def make_head(head, out):
    gpt, _tok, ckpt = import_original(head)
    config = gpt.GPTConfig(sequence_len=64, vocab_size=64, n_layer=2, n_head=1, n_kv_head=1, n_embd=16)
    with torch.device("meta"):
        model = gpt.GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    meta = {"step": STEP, "model_config": vars(config), "user_config": {}, "device_batch_size": 4}
    ckpt.save_checkpoint(str(out / "head" / "base_checkpoints" / "d2"), STEP, model.state_dict(), None, meta)


class Hostile:
    """Unpickling this calls posix.system: what a malicious checkpoint does."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/nanochat-interop-pwned",))


def make_hostile(out):
    hostile = out / "hostile"
    hostile.mkdir(parents=True, exist_ok=True)
    torch.save({"transformer.wte.weight": Hostile()}, hostile / "model_000010.pt")
    write_json(hostile / "meta_000010.json", {"step": STEP, "model_config": CONFIG})
    (hostile / "tokenizer.pkl").write_bytes(pickle.dumps(Hostile()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--v0", required=True, type=Path, help="the original at 3a5e0bc")
    ap.add_argument("--head", required=True, type=Path, help="the original at 92d63d4")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    os.environ["NANOCHAT_BASE_DIR"] = str(args.out / ".nanochat")  # v0 creates it on import
    model, tokenizer = make_original(args.v0, args.out)
    make_hf(model, tokenizer, args.out)
    make_head(args.head, args.out)
    make_hostile(args.out)
    shutil.rmtree(args.out / ".nanochat", ignore_errors=True)
    write_readme(args.out)


def write_readme(out):
    import tiktoken
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, tiktoken {tiktoken.__version__}"
    text = (
        "# Fixtures of `nanochat import` / `export` (tests/interop.rs)\n\n"
        "Made by `bench/interop_fixtures.py` (its docstring says what each file is) from the original nanochat "
        f"at v0 `3a5e0bc` and HEAD `92d63d4`, with {versions}, on CPU. Regenerate with:\n\n"
        "    /work/venv-ref/bin/python bench/interop_fixtures.py --v0 V0_DIR --head HEAD_DIR "
        "--out crates/nanochat/tests/fixtures/interop\n"
    )
    (out / "README.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
