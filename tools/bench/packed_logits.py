"""Check that packing keeps dialogues apart on a device: each dialogue's logits inside a packed
micro-batch equal its logits run alone, for every attention implementation given. A choice whose
kernel or package is missing here is skipped (and said so), not replaced by a fallback.

  python -m tools.bench.packed_logits MODEL_DIR DATA.jsonl --attention sdpa varlen_attn flash_attention_2
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM

from loop.data import batches
from loop.model import attention, moe
from tools.bench import workload


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
    tokenizer, columns, rows = workload.load(a.model, a.data, a.seq_len)
    rows = rows[:2]
    attention.register()
    reference = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(a.device)
    failed = False
    for name in a.attention:
        impl, why = attention.resolve(name)
        if why:
            print(f"{name}: skipped ({why})")
            continue
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation=impl).to(a.device)
        moe.install(model, model.config, None)  # as the loop runs a mixture of experts: no 2-D-mask balancing loss
        layout = attention.layout(impl, "bfd")
        batch = batches.to_device(batches.collate(columns, rows, tokenizer.pad_token_id, layout), a.device)
        worst = 0.0
        with torch.no_grad():
            logits = model.eval()(**batches.model_inputs(batch)).logits.float()
            t, b = 0, 0
            for r, row in enumerate(rows):
                if layout == "mask":
                    t, b = 0, r
                for piece in row:
                    alone = batches.to_device(batches.collate(columns, [[piece]], tokenizer.pad_token_id), a.device)
                    ref = reference(**batches.model_inputs(alone)).logits[0].float()
                    n = piece[2] - piece[1]
                    worst = max(worst, (logits[b, t : t + n] - ref).abs().max().item())
                    t += n
        ok = worst < tol
        failed |= not ok
        print(f"{name}: packed vs alone max |logit diff| = {worst:.3g} ({'ok' if ok else 'FAIL'}, tol {tol})")
        del model
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
