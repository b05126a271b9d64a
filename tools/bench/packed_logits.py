"""Check that packing keeps dialogues apart on a device: each dialogue's logits inside a packed
batch equal its logits run alone, for every attention implementation given.

  python tools/bench/packed_logits.py MODEL_DIR DATA.jsonl --device cuda --attention sdpa flash_attention_2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from loop import data, packing, templates  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention", nargs="+", default=["sdpa", "sdpa_varlen"])
    p.add_argument("--seq-len", type=int, default=2048)
    a = p.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    tol = 0.1 if dtype == torch.bfloat16 else 1e-4  # bf16 logits differ by summation order alone
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    templates.install(tokenizer, "starchat")
    dialogues = [json.loads(line)["messages"] for line in open(a.data)][:64]
    ds = data.tokenize(dialogues, tokenizer, a.seq_len, "drop")
    ids, masks = ds["input_ids"], ds["assistant_mask"]
    rows = packing.plan_rows([len(x) for x in ids], a.seq_len, "bfd")[:2]
    packing.register_attention()
    reference = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(a.device)
    failed = False
    for name in a.attention:
        attention, why = packing.resolve_attention(name)
        if why:
            print(f"{name}: skipped ({why})")
            continue
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation=attention)
        model = model.to(a.device).eval()
        batch = packing.make_batch(rows, ids, masks, tokenizer.pad_token_id, "bfd", attention)
        batch = {k: v.to(a.device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "targets"}
        worst = 0.0
        with torch.no_grad():
            logits = model(**batch).logits.float()
            flat = packing.ATTENTION_MODE.get(attention) == "varlen"
            t, b = 0, 0
            for r, row in enumerate(rows):
                if not flat:
                    t, b = 0, r
                for i, s, e in row:
                    alone = packing.collate([[(i, s, e)]], ids, masks, tokenizer.pad_token_id)
                    alone = {k: v.to(a.device) for k, v in alone.items() if k != "targets"}
                    ref = reference(**alone).logits[0].float()
                    worst = max(worst, (logits[b, t : t + e - s] - ref).abs().max().item())
                    t += e - s
        ok = worst < tol
        failed |= not ok
        print(f"{name}: packed vs alone max |logit diff| = {worst:.3g} ({'ok' if ok else 'FAIL'}, tol {tol})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
