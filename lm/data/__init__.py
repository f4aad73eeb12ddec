"""Data: TFDS array_record dataset -> tokenizer -> Grain pipelines of batches.

    config.data ─► builders.prepare (array_record, built once) ─► tokenizer (trained on train)
      ─► text: pipeline.token_stream (cached) ─► packed windows ─► batches
      ─► labelled / tagged / parallel: records ─► examples.* rows ─► batches
      ─► chat: conversations.encode (chat template, loss weights) ─► packing ─► batches

`make_data(config)` returns a `Data`; its `*_batches` methods return Grain MapDatasets of
host batches, and `iterator()` a prefetching iterator with a checkpointable state.
"""

import dataclasses
import json
import os

import grain
import numpy as np

from lm.data import conversations as conversations_lib
from lm.data import examples, mixture, packing, pipeline
from lm.data.builders import Prepared, default_data_dir, prepare
from lm.data.tokenizers import (ByteTokenizer, CharTokenizer, SentencePieceTokenizer,
                                fingerprint, from_dict, train_tokenizer)
from lm.errors import UserError

__all__ = ["Batching", "ByteTokenizer", "CharTokenizer", "Data", "Prepared", "SentencePieceTokenizer",
           "make_data", "prepare"]

@dataclasses.dataclass(frozen=True)
class Batching:
  """How a task's rows come out of a dataset (each task in lm/tasks/ declares one).

  windows: packed windows of the split's token stream (a text dataset, or a labelled one's
  text column), each optionally passed through `transform(row, tokenizer, rng, data)`, whose
  rng is seeded by (seed, `salt`, window index), so a resumed run sees the same rows.
  examples: one row per record, `example(record, data, seq_len, target_len)`.
  packed: conversations packed several to a row (lm/data/packing.py).
  pairs: preference pairs, a chosen and a rejected sequence per row.
  """
  kind: str  # "windows" | "examples" | "packed" | "pairs"
  transform: object = None  # windows: per-row function (masking, span corruption)
  salt: int = 0
  bucketed: bool = False  # windows: rows cut to data.length_bucket after the transform
  # windows of a one-document stream carry no segment ids or positions: every window is one
  # segment at positions 0..L-1, which the model's plain causal mask already assumes
  one_document_plain: bool = False
  example: object = None  # examples: record -> row

  @property
  def windows(self):
    return self.kind == "windows"


def _default_example(record, data, seq_len, target_len):
  """A format's own rows, for a Batching-less call: classification, tagging, seq2seq."""
  if data.format == "labelled":
    return examples.classification_example(record, data.tokenizer, seq_len)
  if data.format == "tagged":
    return examples.tagging_example(record, data.tokenizer, seq_len, data.tag_ids)
  return examples.seq2seq_example(record, data.tokenizer, seq_len, target_len or seq_len)


FORMAT_BATCHING = {"text": Batching("windows", one_document_plain=True)}
EXAMPLE_BATCHING = Batching("examples", example=_default_example)


@dataclasses.dataclass
class Data:
  prepared: Prepared
  tokenizer: object
  streams: dict  # split -> pipeline.TokenStream, for language models (of text, or of the
  # text column of a labelled dataset)
  num_threads: int = 2
  length_bucket: int = 0  # > 0: example batches cut to their length, rounded up to this
  sentinels: int = 0  # span corruption's sentinel ids, after the tokenizer's (model.extra_tokens)
  # chat: split -> encoded conversations [(ids, weights)] that fit a row (packing.fit);
  # preference: split -> pairs of them (chosen, rejected)
  conversations: dict = dataclasses.field(default_factory=dict)
  # a mixture (data.mixture): split -> each kept conversation's source, and the weights
  sources: dict = dataclasses.field(default_factory=dict)
  weights: tuple = ()

  @property
  def format(self):
    return self.prepared.format

  @property
  def fingerprint(self):
    return self.prepared.fingerprint

  @property
  def source(self):
    return self.prepared.source

  @property
  def tag_ids(self):
    """Tagged datasets: tag name -> id."""
    return {name: i for i, name in enumerate(self.prepared.label_names)}

  def size(self, split):
    """Tokens (text) or examples (labelled, parallel) in `split`."""
    if self.streams:
      return len(self.streams[split]) if split in self.streams else 0
    if self.conversations:
      return len(self.conversations.get(split, ()))
    return self.prepared.num_examples(split)

  def _batching(self, batching):
    """`batching`, or the format's own (causal windows of text; rows of examples)."""
    batching = batching or FORMAT_BATCHING.get(self.format, EXAMPLE_BATCHING)
    wanted = {"packed": "chat", "pairs": "preference"}.get(batching.kind)
    if wanted != (self.format if self.format in ("chat", "preference") else None):
      wants = (f"this objective trains on format {wanted}" if wanted else
               f"format {self.format} trains the {'sft' if self.format == 'chat' else 'dpo'} "
               "objective")
      raise UserError(f"config.data: {wants}; {self.source} is {self.format}")
    if batching.windows and not self.streams:
      raise UserError(f"config.data: this objective trains on a token stream: a text or "
                      f"labelled dataset (made with that objective); {self.source} is "
                      f"{self.format}")
    return batching

  def train_batches(self, batch_size, seq_len, seed, process_index=0, process_count=1,
                    batching=None, target_len=None):
    """Grain MapDataset: batch k is this process's rows of global training batch k."""
    batching = self._batching(batching)
    if batching.kind == "packed":
      batch_fn = packing.PackedTraining(self.conversations["train"], seq_len, seed,
                                        self.tokenizer.pad_id, self.mixed_order(seed)).batch
    elif batching.kind == "pairs":
      batch_fn = packing.PairTraining(self.conversations["train"], seq_len, seed,
                                      self.tokenizer.pad_id).batch
    elif batching.windows:
      batch_fn = pipeline.StreamWindows(self.streams["train"], seq_len, seed,
                                        self.tokenizer.pad_id).batch
      batch_fn = self._windows(batch_fn, batching, seed, process_count, self.streams["train"])
    else:
      batch_fn = self._bucketed(pipeline.rows(self._record_examples(
          "train", seq_len, target_len, batching, shuffle_seed=seed)), process_count)
    return pipeline.train_batches(batch_fn, batch_size, process_index, process_count)

  def _bucketed(self, batch_fn, process_count):
    # Every process must cut a global batch alike; each sees only its rows, so only a
    # single-process run cuts.
    if not self.length_bucket or process_count > 1:
      return batch_fn
    return lambda indices: pipeline.trim_to_bucket(batch_fn(indices), self.length_bucket)

  def eval_batches(self, split, batch_size, seq_len, process_index=0, process_count=1,
                   batching=None, seed=0, target_len=None):
    """Grain MapDataset over every example of `split` once, in order, padded at the end."""
    batching = self._batching(batching)
    if batching.kind == "pairs":
      pairs = self.conversations.get(split, [])
      return pipeline.eval_batches(
          len(pairs), lambda indices: packing.pair_rows(pairs, indices, seq_len,
                                                        self.tokenizer.pad_id),
          batch_size, process_index, process_count)
    if batching.kind == "packed":
      encoded = self.conversations.get(split, [])
      rows = packing.pack([len(ids) for ids, _ in encoded], range(len(encoded)), seq_len)
      return pipeline.eval_batches(
          len(rows), lambda indices: packing.rows_to_batch(
              encoded, [rows[int(i)] for i in indices], seq_len, self.tokenizer.pad_id),
          batch_size, process_index, process_count)
    if batching.windows:
      stream = self.streams[split]
      num_windows = -(-(len(stream) - 1) // seq_len) if len(stream) > 1 else 0

      def batch_fn(indices):
        return pipeline.windows(stream, indices * seq_len, seq_len, self.tokenizer.pad_id)

      batch_fn = self._windows(batch_fn, batching, seed, process_count, stream)
      return pipeline.eval_batches(num_windows, batch_fn, batch_size, process_index,
                                   process_count)
    num = self.prepared.num_examples(split)
    return pipeline.eval_batches(
        num, self._bucketed(pipeline.rows(self._record_examples(split, seq_len, target_len,
                                                                batching)), process_count),
        batch_size, process_index, process_count)

  def mixed_order(self, seed):
    """A mixture's epochs: weighted draws from its sources (None for one dataset)."""
    if not self.weights:
      return None
    sources = np.asarray(self.sources["train"])
    sizes = [int((sources == s).sum()) for s in range(len(self.weights))]
    by_source = [np.flatnonzero(sources == s) for s in range(len(self.weights))]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def order(epoch):
      drawn = mixture.weighted_order(sizes, self.weights, seed, epoch)
      which = np.searchsorted(starts, drawn, side="right") - 1
      return np.asarray([by_source[s][d - starts[s]] for s, d in zip(which, drawn)])
    return order

  def mixture_shares(self, seed, epoch=0):
    """Each source's share of an epoch's training conversations and of its tokens."""
    order = self.mixed_order(seed)(epoch)
    sources = np.asarray(self.sources["train"])[order]
    tokens = np.asarray([len(self.conversations["train"][i][0]) for i in order])
    return [(float(np.mean(sources == s)), float(tokens[sources == s].sum() / tokens.sum()))
            for s in range(len(self.weights))]

  def iterator(self, dataset, state=None):
    return pipeline.iterator(dataset, self.num_threads, state=state)

  def _windows(self, batch_fn, batching, seed, process_count, stream):
    """Packed windows as they are, or each row transformed (masked, span-corrupted)."""
    if batching.transform is not None:
      batch_fn = self._per_row(batch_fn, batching, seed)
      return self._bucketed(batch_fn, process_count) if batching.bucketed else batch_fn
    if batching.one_document_plain and len(stream.doc_starts) <= 1:
      # A stream of one document (a single text file): every window is one segment at
      # positions 0..L-1, the model's defaults, so the batches leave both out and the model
      # applies its plain causal mask, cheaper than comparing segment ids. Only padding at
      # the end of an evaluation split differs, and it is weighted 0 and attended by nothing.
      return lambda indices: {k: v for k, v in batch_fn(indices).items()
                              if k not in ("segment_ids", "positions")}
    return batch_fn

  def _per_row(self, batch_fn, batching, seed):
    def transformed(indices):
      batch = batch_fn(indices)
      out = [batching.transform({k: v[r] for k, v in batch.items()}, self.tokenizer,
                                np.random.default_rng([seed, batching.salt, int(i)]), self)
             for r, i in enumerate(indices)]
      return pipeline.stack(out)
    return transformed

  def _record_examples(self, split, seq_len, target_len, batching, shuffle_seed=None):
    records = self.prepared.sources[split]
    if not len(records):
      raise UserError(f"config.data: the {split} split of {self.source} is empty")
    order = None
    if shuffle_seed is not None:
      order = grain.MapDataset.range(len(records)).shuffle(seed=shuffle_seed).repeat(None)
    make = lambda r: batching.example(r, self, seq_len, target_len)
    return lambda i: make(records[order[i] if order is not None else i])


def _training_texts(prepared):
  """The training split's text, for training a tokenizer (both sides of a parallel set)."""
  records = prepared.sources["train"]
  fields = {"parallel": ("source", "target"), "tagged": ("words",)}.get(prepared.format,
                                                                       ("text",))
  for i in range(len(records)):
    record = records[i]
    if prepared.format in ("chat", "preference"):
      turns = json.loads(record["messages" if prepared.format == "chat" else "prompt"])
      yield "\n".join([t["content"] for t in turns] +
                      ([record["chosen"], record["rejected"]]
                       if prepared.format == "preference" else []))
      continue
    for field in fields:
      yield record[field].replace("\t", " ") if prepared.format == "tagged" else record[field]


def make_data(config, tokenizer_spec=None, windows=False):
  """Prepares the dataset and the tokenizer. `tokenizer_spec` (from a checkpoint) restores
  that exact tokenizer instead of training one. A text dataset is tokenized into token
  streams; a labelled one too with `windows` (a task that trains on its text column)."""
  prepared = prepare(config.data)
  if tokenizer_spec is not None:
    tokenizer = from_dict(tokenizer_spec)
  else:
    tokenizer = train_tokenizer(config.data, _training_texts(prepared))
  streams = {}
  if prepared.format == "text" or (prepared.format == "labelled" and windows):
    cache = os.path.join(config.data.data_dir or default_data_dir(), "lm_tokens",
                         f"{prepared.fingerprint}-{fingerprint(tokenizer)}")
    streams = {split: pipeline.token_stream(records, tokenizer, os.path.join(cache, split),
                                            config.data.num_threads)
               for split, records in prepared.sources.items()}
  sources = {}
  chats = _encoded_conversations(prepared, tokenizer, config.data, sources) if (
      prepared.format in ("chat", "preference")) else {}
  weights = tuple(float(e.get("weight", 1.0)) for e in config.data.get("mixture", ()))
  data = Data(prepared=prepared, tokenizer=tokenizer, streams=streams,
              num_threads=config.data.num_threads, length_bucket=config.data.length_bucket,
              sentinels=config.model.extra_tokens, conversations=chats,
              sources=sources if weights else {}, weights=weights)
  if weights:
    from lm import metrics  # pylint: disable=import-outside-toplevel
    for i, (share, token_share) in enumerate(data.mixture_shares(config.train.seed)):
      metrics.log(f"lm: mixture source {i} ({config.data.mixture[i]['path']}): weight "
                  f"{weights[i]:g}, {share:.1%} of the training conversations, "
                  f"{token_share:.1%} of their tokens")
  return data


def _encoded_conversations(prepared, tokenizer, data_config, sources=None):
  """split -> conversations rendered with the tokenizer's chat template and encoded with
  their loss weights (data.train_on), those longer than a row truncated or dropped
  (data.overflow) and counted in the log."""
  from lm import metrics  # pylint: disable=import-outside-toplevel
  if not getattr(tokenizer, "chat_template", None):
    raise UserError("config.data.format: chat needs a chat template, and this tokenizer has "
                    "none (its checkpoint ships none); use one that does, or lm's own "
                    "tokenizers (ChatML)")
  out = {}
  pairs = prepared.format == "preference"
  for split, records in prepared.sources.items():
    rows = [records[i] for i in range(len(records))]
    encoded = _cached_encoding(prepared, tokenizer, data_config, split, rows, pairs)
    if pairs:
      kept, truncated, dropped = packing.fit_pairs(encoded, data_config.seq_len,
                                                   data_config.overflow)
    else:
      kept_indices = []
      kept, truncated, dropped = packing.fit(encoded, data_config.seq_len,
                                             data_config.overflow, kept_indices)
      if sources is not None and rows and "source" in rows[0]:
        sources[split] = [int(rows[i]["source"]) for i in kept_indices]
    if truncated or dropped:
      kind = "pairs" if pairs else "conversations"
      metrics.log(f"lm: {split}: of {len(encoded):,} {kind}, {truncated:,} longer than "
                  f"data.seq_len + 1 = {data_config.seq_len + 1} tokens truncated and "
                  f"{dropped:,} dropped (longer, with data.overflow=drop, or no token to "
                  "learn left)")
    out[split] = kept
  return out


def _cached_encoding(prepared, tokenizer, data_config, split, rows, pairs):
  """The split's records encoded (conversations.encode / encode_pair), once per dataset,
  tokenizer, template and data.train_on: rendering every conversation's prefixes is most
  of a chat run's start, so the arrays are kept beside the token streams."""
  import hashlib  # pylint: disable=import-outside-toplevel
  key = hashlib.md5(json.dumps([tokenizer.chat_template, data_config.train_on]).encode())
  folder = os.path.join(data_config.data_dir or default_data_dir(), "lm_chats",
                        f"{prepared.fingerprint}-{fingerprint(tokenizer)}-"
                        f"{key.hexdigest()[:12]}")
  path = os.path.join(folder, f"{split}.npz")
  sides = ("chosen", "rejected") if pairs else ("",)
  if not os.path.exists(path):
    if pairs:
      encoded = [conversations_lib.encode_pair(json.loads(r["prompt"]), r["chosen"],
                                               r["rejected"], tokenizer) for r in rows]
    else:
      encoded = [(conversations_lib.encode(json.loads(r["messages"]), tokenizer,
                                           data_config.train_on),) for r in rows]
    arrays = {}
    for s, side in enumerate(sides):
      part = [e[s] for e in encoded]
      arrays[f"{side}ids"] = np.concatenate([ids for ids, _ in part] or [np.zeros(0, np.int32)])
      arrays[f"{side}weights"] = np.concatenate([w for _, w in part] or [np.zeros(0)])
      arrays[f"{side}lengths"] = np.asarray([len(ids) for ids, _ in part], np.int64)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # whole or not at all
  with np.load(path) as saved:
    columns = []
    for side in sides:
      ends = np.cumsum(saved[f"{side}lengths"])
      ids, weights = saved[f"{side}ids"], saved[f"{side}weights"].astype(np.float32)
      columns.append([(ids[e - n:e], weights[e - n:e])
                      for e, n in zip(ends, saved[f"{side}lengths"])])
  return list(zip(*columns)) if pairs else columns[0]
