"""The embedded default: real dialogues from chatterbot-corpus, a tokenizer trained on them and a
tiny StarCoder-architecture model with random weights, saved with `save_pretrained` so the run
loads them through the same `from_pretrained` path as a Hub model. Everything is deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import chatterbot_corpus
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM, PreTrainedTokenizerFast

from loop import data, templates

CORPUS_DIR = Path(chatterbot_corpus.__file__).parent / "data" / "english"


def convert_corpus(out_file: Path) -> int:
    """Write every English chatterbot conversation as a messages-schema JSONL line."""
    files = sorted(str(p) for p in CORPUS_DIR.glob("*.yml"))
    dialogues, _ = data.load_dialogues(files, "chatterbot", on_bad_record="error")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with out_file.open("w") as f:
        for d in dialogues:
            f.write(json.dumps({"messages": d}, ensure_ascii=False) + "\n")
    return len(dialogues)


def train_tokenizer(texts: list[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Byte-level BPE like StarCoder's, with `<|endoftext|>` and the StarChat tokens as specials."""
    specials = ["<|endoftext|>", *templates.STARCHAT.special_tokens]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   model_max_length=1024)
    fast.add_special_tokens({"additional_special_tokens": list(templates.STARCHAT.special_tokens)})
    return fast


def build(out_dir: Path, data_file: Path, n_embd: int = 128, n_layer: int = 4, n_head: int = 4,
          n_positions: int = 1024, seed: int = 0, vocab_size: int | None = None, device: str = "cpu",
          dtype: torch.dtype = torch.float32) -> None:
    """vocab_size pads the model's embedding beyond the tokenizer (StarCoder's is 49152), for benchmarks;
    device "cuda" initializes a large benchmark model in seconds instead of minutes."""
    n = convert_corpus(data_file)
    texts = [m["content"] for line in data_file.open() for m in json.loads(line)["messages"]]
    tokenizer = train_tokenizer(texts)
    torch.manual_seed(seed)
    config = GPTBigCodeConfig(
        vocab_size=max(vocab_size or 0, len(tokenizer)), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.device(device):
        model = GPTBigCodeForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(f"wrote {n} dialogues to {data_file}; model ({model.num_parameters():,} parameters, "
          f"vocab {len(tokenizer)}) and tokenizer to {out_dir}")
