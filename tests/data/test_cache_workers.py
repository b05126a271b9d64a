"""The preparation's worker processes import only what they run: no torch (190 MB and a second a worker, through
batches.py), no transformers (25 MB and 0.6 s: the Rust tokenizer encodes, and Jinja renders only templates
render.py does not compile), and not the main module (under loop/train.py spawn imported it, and with it the
whole loop, in every worker). On the data_prep bench the two workers added 0.54 GB to a 0.34 GB training process."""

import sys

from loop.data import prepare as prep
from loop.data import workers
from tests.data.test_prepare import data_config, jsonl

HEAVY = {"torch", "deepspeed", "accelerate", "peft", "transformers"}


def test_a_preparation_worker_imports_neither_torch_transformers_nor_the_main_module(tokenizer, corpus, tmp_path,
                                                                                     monkeypatch):
    main = tmp_path / "train.py"  # a main module as `python loop/train.py` has one
    main.write_text("import torch\n")
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)
    monkeypatch.setattr(sys.modules["__main__"], "__file__", str(main), raising=False)
    cfg = data_config(tmp_path, [jsonl(tmp_path / "a.jsonl", corpus[:50])])
    planned = [prep.plan(s) for s in prep.resolve(cfg)]
    job = workers.Job(planned, tokenizer, cfg.seq_len, cfg.on_too_long, cfg.oasst_paths, "uint16")
    with workers.pool(job, 1) as pool:
        with workers.main_unseen():  # as workers.chunks starts them
            chunk = pool.submit(workers.work, (0, planned[0].units)).result()  # a real work item, tokenized there
        loaded = pool.submit(eval, "sorted(__import__('sys').modules)").result()
        mains = pool.submit(eval, f"[n for n, m in __import__('sys').modules.items() if getattr(m, '__file__', '') "
                                  f"== {str(main)!r}]").result()
    assert len(chunk.lengths) == 50 and len(chunk.tokens) == chunk.lengths.sum() > 0
    assert "loop.data.workers" in loaded and "tokenizers" in loaded
    assert not sorted(m for m in loaded if m.split(".")[0] in HEAVY) and mains == []
    assert sys.modules["__main__"].__file__ == str(main)  # the main module is itself again
