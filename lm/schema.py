"""Every config field, declared once: its default, type, choices or bounds, and its role.

lm/config.py derives from this table `defaults()` (the ConfigDict experiments start from)
and the per-field checks of `validate()`; lm/checkpoint.py the fields a resumed run may
change (RESUMABLE); lm/pretrained.py the fields init_from takes over (ARCHITECTURE); and
lm/models/layers.py the frozen ModelConfig the models see (MODEL_VIEW). Adding a field is
one line here (plus the code that reads it).

Flags of a Field:
    resumable     may differ between a checkpoint's config and the config resuming from it:
                  it changes how long or how visibly a run goes, not what it computes
    architecture  init_from's model sets it (the pretrained checkpoint's value wins)
    model         part of lm.models.ModelConfig
Bounds: POSITIVE (> 0), NON_NEGATIVE (>= 0), UNIT ([0, 1)). `choices` may be a Registry:
the names a registry of lm supplies (task.objective: lm.tasks), checked by lm/config.py.
This module imports nothing of lm, so the models can derive their view from it.
"""

import dataclasses

POSITIVE, NON_NEGATIVE, UNIT = "> 0", ">= 0", "in [0, 1)"
DTYPES = ("float32", "bfloat16", "float16")
KERNELS = ("auto", "xla", "cpu", "cudnn", "pallas_gpu", "splash")  # lm.models.kernels


@dataclasses.dataclass(frozen=True)
class Registry:
  name: str  # "objectives": lm.tasks.OBJECTIVES


@dataclasses.dataclass(frozen=True)
class Field:
  name: str  # section.key ("model.d_model"), or a top-level key ("init_from")
  default: object
  type: type = None  # the default's type, unless given (a None default needs one)
  choices: object = None  # a tuple, or a Registry
  bound: str = None  # POSITIVE | NON_NEGATIVE | UNIT
  resumable: bool = False
  architecture: bool = False
  model: bool = False

  @property
  def value_type(self):
    return self.type or type(self.default)

  @property
  def key(self):
    return self.name.rsplit(".", 1)[-1]


def _fields(section, *specs, **flags):
  """Fields of one section: (key, default, options dict?) tuples, `flags` on each."""
  out = []
  for spec in specs:
    key, default, *options = spec
    out.append(Field(f"{section}.{key}" if section else key, default,
                     **{**flags, **(options[0] if options else {})}))
  return out


_ARCH = {"architecture": True, "model": True}
_RES = {"resumable": True}

FIELDS = (
    # Start from a pretrained lm workdir (its best checkpoint, else its latest) or hf:FOLDER:
    # its model architecture and tokenizer are used, its parameters loaded, and a task head
    # that it lacks is initialised afresh. "": train from scratch.
    *_fields("", ("init_from", "", _RES)),
    *_fields(
        "task",
        # causal: decoder LM on text | mlm: encoder, masked LM on text | classification /
        # regression: encoder + pooled head on a labelled dataset | tagging: encoder +
        # per-token head on a tagged dataset | seq2seq: encoder-decoder on a parallel dataset
        # (translation) | span_corruption: encoder-decoder, T5's pretraining on text.
        # See lm/tasks/.
        ("objective", "causal", {"choices": Registry("objectives")}),
        # classification / tagging; 0: as many as the dataset has
        ("num_labels", 0, {"bound": NON_NEGATIVE}),
        # cls: the first token (the tokenizer's bos, BERT's [CLS]), through the encoder's
        # pooler with model.pooler | mean: the mean over non-padding tokens
        ("pooling", "cls", {"choices": ("cls", "mean")}),
        # Of the training loss of token predictions (causal, mlm, seq2seq): the target
        # becomes (1 - e) one-hot + e uniform. Evaluation losses never smooth.
        ("label_smoothing", 0.0, {"bound": UNIT}),
        # seq2seq: the final validation and test figures include corpus BLEU and chrF
        # (sacrebleu) of beam-search translations: beam size (1: greedy), GNMT length
        # penalty alpha, and how many sentences of each split (0: all; fewer: quicker).
        ("beam_size", 4, {"bound": POSITIVE, **_RES}),
        ("length_penalty", 0.6, {"bound": NON_NEGATIVE, **_RES}),
        ("bleu_sentences", 0, {"bound": NON_NEGATIVE, **_RES}),
        # dpo (Rafailov et al. 2023): beta, the strength of the KL anchor to the reference
        # (init_from's model); the loss: dpo (-log sigmoid of beta times the margin) | ipo
        # (Azar et al.: (margin - 1 / (2 beta))^2); dpo_label_smoothing: conservative DPO's
        # share of flipped labels (Mitchell 2023), in [0, 0.5).
        ("beta", 0.1, {"bound": POSITIVE}),
        ("preference_loss", "dpo", {"choices": ("dpo", "ipo")}),
        ("dpo_label_smoothing", 0.0, {"bound": UNIT}),
        # Evaluation by generation at every evaluation of a decoder (lm/evaluate.py's tasks,
        # on eval_data: its first eval_limit examples, replies of up to eval_max_tokens;
        # eval_labels: classify's label words, comma-separated): the scores go to the log,
        # metrics.jsonl and TensorBoard as eval/<score>. "": none.
        ("eval_generate", "", {"choices": ("", "squad", "gsm", "classify", "translate"),
                               **_RES}),
        ("eval_data", "", _RES),
        ("eval_limit", 200, {"bound": POSITIVE, **_RES}),
        ("eval_max_tokens", 64, {"bound": POSITIVE, **_RES}),
        ("eval_labels", "", _RES),
    ),
    *_fields(
        "peft",
        # Parameter-efficient fine-tuning of init_from's model (lm/peft.py): "" trains every
        # parameter | lora: low-rank adapters on the dense projections `targets` names |
        # bitfit: the bias vectors only. The task head always trains.
        ("method", "", {"choices": ("", "lora", "bitfit")}),
        ("rank", 8, {"bound": POSITIVE}),
        ("alpha", 16.0, {"bound": POSITIVE}),  # the adapters' output is scaled by alpha / rank
        ("dropout", 0.0, {"bound": UNIT}),  # on the adapters' input, in training
        # re.search over each Dense's module path: encoder/layer_0/attn/{query,key,value,
        # out}, .../mlp/{wi,wo} (wi_gate, wi_up with swiglu); decoders have no encoder/.
        ("targets", r"attn/(query|value)$"),
    ),
    *_fields(
        "model",
        ("num_layers", 4, {"bound": POSITIVE}),
        ("num_heads", 4, {"bound": POSITIVE}),
        # < num_heads: grouped-query attention; 1: multi-query.
        ("num_kv_heads", 4, {"bound": POSITIVE}),
        ("d_model", 128, {"bound": POSITIVE}),
        ("d_ff", 512, {"bound": POSITIVE}),
        # None: the tokenizer's vocabulary size. Larger values pad the embedding table.
        ("vocab_size", None, {"type": int, "model": False}),
        # Token ids after the vocabulary: span corruption's sentinels (T5 keeps 100). An
        # encoder-decoder pretrained with them and one fine-tuned from it share the
        # embedding. (ModelConfig.vocab_size includes them.)
        ("extra_tokens", 0, {"bound": NON_NEGATIVE, "model": False}),
        ("max_len", 256, {"bound": POSITIVE}),
        # Per-head size; 0: d_model / num_heads (Qwen3 and Gemma set their own).
        ("head_size", 0, {"bound": NON_NEGATIVE}),
        # rmsnorm_1p: RMSNorm scaled by (1 + scale), its scale initialised at 0 (Gemma)
        ("norm", "layernorm", {"choices": ("layernorm", "rmsnorm", "rmsnorm_1p")}),
        ("norm_eps", 1e-5),
        # pre (GPT-2, Llama) | post (BERT: norm after each residual) | sandwich (Gemma 2/3:
        # a norm before and one after each sub-layer, the residual added after both)
        ("norm_position", "pre", {"choices": ("pre", "post", "sandwich")}),
        ("positions", "learned", {"choices": ("learned", "rope")}),
        ("rope_theta", 10000.0),
        # RoPE base of the sliding-window layers; 0: rope_theta (Gemma 3: 10,000 local,
        # 1,000,000 global)
        ("rope_local_theta", 0.0, {"bound": NON_NEGATIVE}),
        # gelu (exact, erf) | gelu_tanh (GPT-2's approximation) | swiglu | geglu (tanh-GELU
        # gate times an up projection, Gemma)
        ("mlp", "gelu", {"choices": ("gelu", "gelu_tanh", "swiglu", "geglu")}),
        ("use_bias", False),  # biases on every projection and norm (GPT-2, BERT)
        ("qkv_bias", False),  # biases on the query, key and value projections only (Qwen2)
        # queries and keys normalised per head (model.norm) before RoPE (Qwen3, Gemma 3)
        ("qk_norm", False),
        # > 0: a token attends to itself and the sliding_window - 1 tokens before it (Mistral,
        # Gemma's local layers), in training and in cached decoding alike.
        ("sliding_window", 0, {"bound": NON_NEGATIVE}),
        # With a window: every global_every-th layer (layers n-1, 2n-1, ...) attends to the
        # whole context, the others through the window (Gemma 2: 2, Gemma 3: 6); 0: every
        # layer through the window (Mistral).
        ("global_every", 0, {"bound": NON_NEGATIVE}),
        # Attention scores scaled by query_pre_attn_scalar ** -0.5; 0: the head size (Gemma).
        ("query_pre_attn_scalar", 0.0, {"bound": NON_NEGATIVE}),
        # > 0: scores (after scaling) and output logits soft-capped, c * tanh(x / c) (Gemma 2)
        ("attn_softcap", 0.0, {"bound": NON_NEGATIVE}),
        ("final_softcap", 0.0, {"bound": NON_NEGATIVE}),
        ("embed_scale", False),  # token embeddings times sqrt(d_model) (Gemma)
        ("tie_embeddings", True),
        ("type_vocab_size", 0, {"bound": NON_NEGATIVE}),  # > 0: BERT's token types (A/B)
        # encoders: BERT's pooler, tanh(dense(first token)), for task heads
        ("pooler", False),
        **_ARCH),
    *_fields(
        "model",
        ("dropout", 0.0, {"bound": UNIT}),
        ("dtype", "float32", {"choices": DTYPES}),  # compute dtype
        ("param_dtype", "float32", {"choices": DTYPES}),
        # Activation rematerialisation per block: none | full (recompute the whole block in
        # the backward pass) | dots (keep matmul outputs, recompute the rest).
        ("remat", "none", {"choices": ("none", "full", "dots"), **_RES}),
        # one nn.scan over stacked layers: compile time flat in depth
        ("scan_layers", False),
        # The products' and attention's implementation (lm/models/kernels): auto (chosen from
        # the mesh's platform) | xla | cpu | cudnn | pallas_gpu (GPU) | splash (TPU).
        ("kernels", "auto", {"choices": KERNELS, **_RES}),
        model=True),
    *_fields(
        "train",
        ("batch_size", 12, {"bound": POSITIVE}),
        # Micro-batches per step: the same update as one batch of batch_size, in 1/n the
        # activation memory (the micro-batches run one after another inside the step).
        ("grad_accum_steps", 1, {"bound": POSITIVE}),
        # Train steps per dispatch from Python: n > 1 runs up to n steps as one compiled
        # scan over n batches, paying the host's per-call work once (on a CPU, small models
        # train a third faster or more). Logging, evaluation and checkpoints still happen at
        # their steps: a dispatch ends at each of them. The updates are those of single steps.
        ("steps_per_dispatch", 1, {"bound": POSITIVE, **_RES}),
        ("num_steps", 1000, {"bound": POSITIVE, **_RES}),
        ("learning_rate", 1e-3, {"bound": POSITIVE}),
        ("min_learning_rate", 1e-4, {"bound": NON_NEGATIVE}),  # end of the cosine decay
        ("warmup_steps", 100, {"bound": NON_NEGATIVE}),
        ("b1", 0.9, {"bound": UNIT}),
        ("b2", 0.99, {"bound": UNIT}),
        # applied to matrices and embeddings, not to norms or biases
        ("weight_decay", 0.1, {"bound": NON_NEGATIVE}),
        ("grad_clip", 1.0, {"bound": NON_NEGATIVE}),  # global norm; 0 disables clipping
        # > 0: the task head's own peak rate (same schedule)
        ("head_learning_rate", 0.0, {"bound": NON_NEGATIVE}),
        # > 0: stop after this many evaluations in a row without a better validation score
        # (lm/tasks/ says which score). The best checkpoint is kept in workdir/best anyway.
        ("early_stopping", 0, {"bound": NON_NEGATIVE, **_RES}),
        ("eval_every", 250, {"bound": POSITIVE, **_RES}),
        # Batches per periodic eval of a language model; 0: the whole validation split.
        # Task scores (accuracy, F1, correlations) always cover the whole split.
        ("eval_steps", 20, {"bound": NON_NEGATIVE, **_RES}),
        ("checkpoint_every", 500, {"bound": POSITIVE, **_RES}),
        ("keep_checkpoints", 3, {"bound": POSITIVE, **_RES}),
        ("log_every", 50, {"bound": POSITIVE, **_RES}),
        # A step whose loss or gradients are NaN/Inf never changes the parameters. Then
        # stop: end the run naming the step (checkpoints stay as they were); skip: go on,
        # counted in train/skipped_steps.
        ("nonfinite", "stop", {"choices": ("stop", "skip"), **_RES}),
        # float16 compute loses small gradients unless the loss is scaled: dynamic scaling
        # starts at 2**15, halves on an overflow (that step is skipped, counted in
        # train/skipped_steps) and doubles after 2,000 finite steps; train/loss_scale logs
        # it. auto: dynamic with model.dtype float16, none otherwise.
        ("loss_scale", "auto", {"choices": ("auto", "dynamic", "none")}),
        # the one seed: initialisation, data order, dropout and sampling
        ("seed", 0),
        # > 0: write a jax.profiler trace of this many steps (from the third step of the
        # run) to workdir/profile, for TensorBoard's profile plugin.
        ("profile_steps", 0, {"bound": NON_NEGATIVE, **_RES}),
    ),
    *_fields(
        "data",
        # Used when `path` is empty: python_stdlib (built in, offline), a TFDS catalog
        # dataset: tiny_shakespeare | lm1b | wmt14_translate | glue/sst2 | imdb_reviews
        # (downloaded once), or multi30k (format parallel; lm/data/downloads.py fetches it).
        # Name and path may change on resume: the data's own fingerprint is compared.
        ("name", "python_stdlib", _RES),
        # local data; overrides `name`. Its layout depends on `format`: text: a text file or
        # a folder of them | parallel: a folder of <split>.<language>[.gz] files | labelled:
        # a folder of <split>.tsv / <split>.csv files with a header line.
        ("path", "", _RES),
        # ... | chat: conversations (JSON / JSONL: messages, ShareGPT, Alpaca or
        # prompt/completion records), a folder of <split>.jsonl files or one file
        # ... | preference: pairs of a prompt and a chosen and a rejected reply (same files)
        ("format", "text", {"choices": ("text", "parallel", "labelled", "tagged", "chat",
                                        "preference")}),
        ("data_dir", "", _RES),  # where built datasets are cached; "": ~/.cache/lm/tfds
        # byte | char | unigram | bpe (SentencePiece, trained on the train split) |
        # pretrained (init_from's own, e.g. an imported Hugging Face tokenizer)
        ("tokenizer", "byte", {"choices": ("byte", "char", "unigram", "bpe", "pretrained")}),
        ("vocab_size", 4096, {"bound": POSITIVE}),  # for unigram / bpe
        ("seq_len", 128, {"bound": POSITIVE}),
        # of a text corpus (by character for a single file)
        ("validation_fraction", 0.05, {"bound": NON_NEGATIVE}),
        ("test_fraction", 0.05, {"bound": NON_NEGATIVE}),
        ("source_language", "en"),  # parallel: file suffixes (source -> target)
        ("target_language", "de"),
        # labelled: header names; "" text_column: the other column
        ("label_column", "label"),
        ("text_column", ""),
        ("num_threads", 2, {"bound": POSITIVE, **_RES}),  # Grain threads
        # chat: several datasets mixed by weight, each turned into conversations by prompt
        # templates (lm/data/mixture.py): a tuple of {path, weight, reader, user,
        # assistant, system} dicts; () reads data.path alone.
        ("mixture", (), {"type": tuple}),
        # chat: the tokens a conversation's loss weighs (lm/data/conversations.py):
        # all_assistant | last_assistant | everything
        ("train_on", "all_assistant",
         {"choices": ("all_assistant", "last_assistant", "everything")}),
        # chat: a conversation longer than seq_len + 1 tokens is truncated or dropped (both
        # counted in the log)
        ("overflow", "truncate", {"choices": ("truncate", "drop")}),
        # > 0: batches of labelled / tagged / parallel examples are cut to their longest
        # example (source and target each), rounded up to a multiple of this (one
        # compilation per length); 0: always seq_len. Single-process runs only (processes
        # would cut one global batch differently).
        ("length_bucket", 16, {"bound": NON_NEGATIVE, **_RES}),
    ),
    *_fields(
        "mesh",
        ("data", -1),  # -1: every device not used by the other axes
        ("fsdp", 1),
        ("tensor", 1),
        **_RES),
    *_fields(
        "log",
        # per device, for MFU; 0: look up the device kind
        ("peak_flops", 0.0, {"bound": NON_NEGATIVE}),
        # How MFU counts causal self-attention: palm (whole, PaLM appendix B) | causal_half
        # (half: the masked triangle left out, MaxText's convention since 2025).
        ("attention_flops", "palm", {"choices": ("palm", "causal_half")}),
        **_RES),
    *_fields(
        "eval",
        # lm-evaluation-harness tasks (lm/harness.py; lm's own in lm/harness_tasks, or any of
        # lm-eval's), comma-separated, run on a decoder at the evaluations of steps that
        # harness_every divides (0: every evaluation) and at the last step; scores go to the
        # log, metrics.jsonl and TensorBoard as harness/<task>/<metric>. harness_limit: the
        # first N examples of each task (0: all); harness_data: the local tasks' data folder
        # ("": ../shared/data beside the repository); harness_num_fewshot: -1, each task's
        # own; harness_max_tokens: 0, each generation task's own.
        ("harness_tasks", ""),
        ("harness_every", 0, {"bound": NON_NEGATIVE}),
        ("harness_limit", 0, {"bound": NON_NEGATIVE}),
        ("harness_data", ""),
        ("harness_num_fewshot", -1),
        ("harness_max_tokens", 0, {"bound": NON_NEGATIVE}),
        **_RES),
    *_fields(
        "sample",
        ("prompt", "\n"),
        ("num_tokens", 200, {"bound": NON_NEGATIVE}),
        ("temperature", 0.8, {"bound": NON_NEGATIVE}),
        ("top_k", 40, {"bound": NON_NEGATIVE}),  # 0: no top-k filtering
        **_RES),
)

BY_NAME = {f.name: f for f in FIELDS}
RESUMABLE = frozenset(f.name for f in FIELDS if f.resumable)
ARCHITECTURE = tuple(f.key for f in FIELDS if f.architecture)  # model fields
MODEL_VIEW = tuple(f for f in FIELDS if f.model)  # lm.models.ModelConfig's fields
