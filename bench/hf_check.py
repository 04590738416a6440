"""Checks `nanochat export --format hf` against transformers: exports a trained model, loads it with
`AutoModelForCausalLM` / `AutoTokenizer` (no custom code, transformers' own NanoChatForCausalLM), and
compares, prompt by prompt, with our model (`nanochat bench logits`):
- the token ids (transformers' tokenizer from our tokenizer.json vs ours), plain text and through the chat
  template (`apply_chat_template` vs our conversation rendering);
- the logits at every position (max |difference|);
- the greedy continuation of the model alone (tokens and text; transformers' `generate`, do_sample=False;
  ours without the calculator tool the engine runs).

    cargo build --release
    NANOCHAT_BASE_DIR=... /work/venv-ref/bin/python bench/hf_check.py [-i sft -g d20] [--dtype f32]

A model trained here (or by the original) saw bf16-rounded rotary tables and transformers computes them in
fp32, so the logits differ by a few 1e-3 there and greedy tokens can differ where two logits are that close; a
model that came from transformers in the first place matches to float rounding. Prints a line per prompt
and one JSON line.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "12 + 35 = ",
]
CHATS = ["Why is the sky blue?", "What is 7 times 8?"]


def nanochat(binary, args):
    out = subprocess.run([binary, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"nanochat {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return out.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nanochat", default="target/release/nanochat", help="the nanochat binary")
    ap.add_argument("-i", "--source", default=None, help="stage of the model (nanochat's -i)")
    ap.add_argument("-g", "--model-tag", default=None)
    ap.add_argument("-s", "--step", default=None)
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32", help="export precision")
    ap.add_argument("--out", default=None, help="export directory [default: a temporary one]")
    ap.add_argument("--greedy", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    select = []
    for flag, value in (("-i", args.source), ("-g", args.model_tag), ("-s", args.step)):
        if value is not None:
            select += [flag, str(value)]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out or os.path.join(tmp, "export")
        print(nanochat(args.nanochat, ["export", out_dir, "--format", "hf", "--dtype", args.dtype, "--force", *select]).strip())
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype)
        model.eval()
        tok = AutoTokenizer.from_pretrained(out_dir)
        print(f"transformers loaded {type(model).__name__} and {type(tok).__name__} from {out_dir}")
        stops = [tok.convert_tokens_to_ids("<|assistant_end|>"), tok.convert_tokens_to_ids("<|bos|>")]

        rows = []
        cases = [(p, False) for p in PROMPTS] + [(c, True) for c in CHATS]
        for text, chat in cases:
            ours = json.loads(
                nanochat(args.nanochat, ["bench", "logits", "--prompt", text, "--greedy", str(args.greedy), *select]
                         + (["--chat"] if chat else []))
            )
            if chat:
                ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            else:
                ids = [tok.convert_tokens_to_ids("<|bos|>")] + tok.encode(text, add_special_tokens=False)
            ids_match = list(ids) == ours["ids"]
            x = torch.tensor([ours["ids"]])
            with torch.no_grad():
                theirs = model(x).logits[0].float()
                gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.greedy, do_sample=False,
                                     eos_token_id=stops, pad_token_id=stops[1])
            greedy = gen[0, x.shape[1]:].tolist()
            while greedy and greedy[-1] in stops:
                greedy.pop()
            diff = (theirs - torch.tensor(ours["logits"])).abs().max().item()
            same = greedy == ours["greedy"]
            rows.append({"prompt": text, "chat": chat, "ids_match": ids_match, "logits_max_abs_diff": diff,
                         "greedy_match": same, "ours": ours["greedy_text"], "transformers": tok.decode(greedy)})
            print(f"{'chat ' if chat else ''}{text!r}: ids {'equal' if ids_match else 'DIFFER'}, logits max|diff| "
                  f"{diff:.2e}, greedy {'equal' if same else 'DIFFERS'}\n  ours: {ours['greedy_text']!r}\n"
                  f"  transformers: {tok.decode(greedy)!r}")
        summary = {
            "impl": "hf_check",
            "rotary": ours["rotary"],
            "dtype": args.dtype,
            "ids_match": all(r["ids_match"] for r in rows),
            "logits_max_abs_diff": max(r["logits_max_abs_diff"] for r in rows),
            "greedy_match": sum(r["greedy_match"] for r in rows),
            "cases": len(rows),
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
