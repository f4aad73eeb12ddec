"""Per-objective examples: masked-LM masking, classification rows, seq2seq pairs.

Every function returns a dict of fixed-shape numpy arrays (one row of a batch); padding has
segment id 0 and weight 0. Randomness (MLM masking) comes from a generator seeded by
(seed, example index), so the same run always sees the same masks, resumed or not.
"""

import numpy as np

MASK_RATE = 0.15


def special_ids(tokenizer):
  return np.array(sorted({tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id,
                          tokenizer.unk_id, tokenizer.mask_id}), np.int32)


def mlm_example(example, tokenizer, rng, rate=MASK_RATE):
  """BERT masking of a packed window's `inputs`: `rate` of the ordinary tokens are chosen;
  of those 80% become `mask`, 10% a random ordinary token, 10% stay. The loss counts the
  chosen positions only (`weights`), whose `targets` are the original tokens."""
  ids = example["inputs"]
  specials = special_ids(tokenizer)
  candidate = (example["segment_ids"] > 0) & ~np.isin(ids, specials)
  chosen = candidate & (rng.random(ids.shape) < rate)
  action = rng.random(ids.shape)
  ordinary = np.setdiff1d(np.arange(tokenizer.vocab_size, dtype=np.int32), specials)
  random_ids = ordinary[rng.integers(0, len(ordinary), ids.shape)]
  masked = np.where(chosen & (action < 0.8), tokenizer.mask_id, ids)
  masked = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
  return {"inputs": masked.astype(np.int32), "targets": ids.astype(np.int32),
          "weights": chosen.astype(np.float32), "segment_ids": example["segment_ids"],
          "positions": example["positions"]}


def _padded(ids, length, pad_id):
  out = np.full(length, pad_id, np.int32)
  out[:len(ids)] = ids
  mask = np.zeros(length, np.int32)
  mask[:len(ids)] = 1
  return out, mask


def classification_example(record, tokenizer, seq_len, regression=False):
  """`bos` (BERT's [CLS]) + the text's tokens (+ `eos`, BERT's [SEP], for tokenizers that
  end inputs with it), cut to seq_len, padded; and the label (its class id, or for
  regression its number)."""
  if getattr(tokenizer, "end_with_eos", False):  # BERT: [CLS] text [SEP]
    ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(record["text"])[:seq_len - 2],
                          [tokenizer.eos_id]])
  else:
    ids = np.concatenate([[tokenizer.bos_id],
                          tokenizer.encode(record["text"])[:seq_len - 1]])
  inputs, mask = _padded(ids, seq_len, tokenizer.pad_id)
  label = np.float32(record["value"]) if regression else np.int32(record["label"])
  return {"inputs": inputs, "segment_ids": mask, "positions": np.arange(seq_len, dtype=np.int32),
          "label": label, "example_weight": np.float32(1.0), "length": np.int32(len(ids))}


def tagging_example(record, tokenizer, seq_len, tag_ids):
  """`bos` + each word's tokens (words after the first with a leading space, as in running
  text). A word's tag is predicted at its first token (weight 1); its other tokens, bos and
  padding have weight 0. Words past seq_len are cut."""
  ids, tags, weights = [tokenizer.bos_id], [0], [0.0]
  for i, (word, tag) in enumerate(zip(record["words"].split("\t"), record["tags"].split("\t"))):
    pieces = tokenizer.encode(word if i == 0 else " " + word).tolist() or [tokenizer.unk_id]
    if len(ids) + len(pieces) > seq_len:
      break
    ids += pieces
    tags += [tag_ids[tag]] + [0] * (len(pieces) - 1)
    weights += [1.0] + [0.0] * (len(pieces) - 1)
  inputs, mask = _padded(np.array(ids, np.int32), seq_len, tokenizer.pad_id)
  tags_out, _ = _padded(np.array(tags, np.int32), seq_len, 0)
  weights_out = np.zeros(seq_len, np.float32)
  weights_out[:len(weights)] = weights
  return {"inputs": inputs, "segment_ids": mask, "positions": np.arange(seq_len, dtype=np.int32),
          "tags": tags_out, "weights": weights_out}


def seq2seq_example(record, tokenizer, source_len, target_len):
  """Source `tokens + eos`; decoder inputs `bos + tokens`, targets `tokens + eos`; padded."""
  src = np.concatenate([tokenizer.encode(record["source"])[:source_len - 1],
                        [tokenizer.eos_id]])
  tgt = tokenizer.encode(record["target"])[:target_len - 1]
  source, source_mask = _padded(src, source_len, tokenizer.pad_id)
  target_in, target_mask = _padded(np.concatenate([[tokenizer.bos_id], tgt]), target_len,
                                   tokenizer.pad_id)
  target_out, _ = _padded(np.concatenate([tgt, [tokenizer.eos_id]]), target_len,
                          tokenizer.pad_id)
  return {"source": source, "source_segment_ids": source_mask,
          "inputs": target_in, "targets": target_out, "segment_ids": target_mask,
          "weights": target_mask.astype(np.float32),
          "source_length": np.int32(len(src)), "target_length": np.int32(len(tgt) + 1)}


def noise_spans(n, rng, density=0.15, mean_span=3.0, max_spans=100):
  """T5's random spans: a [n] bool mask with round(n * density) noise tokens in about
  (that / mean_span) spans, the spans and the gaps between them of random lengths; the
  first token is never noise."""
  num_noise = int(np.clip(round(n * density), 1, max(n - 1, 1)))
  num_spans = int(np.clip(round(num_noise / mean_span), 1, min(num_noise, n - num_noise,
                                                               max_spans)))

  def split(total):  # `total` into num_spans positive parts, uniformly at random
    cuts = np.sort(rng.choice(np.arange(1, total), num_spans - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))

  mask = np.zeros(n, bool)
  at = 0
  for keep, noise in zip(split(n - num_noise), split(num_noise)):
    at += keep
    mask[at:at + noise] = True
    at += noise
  return mask


def span_corruption_example(window, tokenizer, sentinels, rng, seq_len, density=0.15,
                            mean_span=3.0):
  """T5's span corruption of a packed text window: the source keeps the window's tokens
  with each noise span replaced by one sentinel (ids tokenizer.vocab_size, +1, ..., at most
  `sentinels` of them), then eos; the target is each sentinel followed by the span it
  replaced, then eos."""
  sentinel_start = tokenizer.vocab_size
  ids = window["inputs"][window["segment_ids"] > 0][:seq_len - 1]
  if len(ids) < 2:  # nothing to corrupt (an empty tail window): an all-padding row
    zeros = np.zeros(seq_len, np.int32)
    return {"source": zeros, "source_segment_ids": zeros, "inputs": zeros, "targets": zeros,
            "segment_ids": zeros, "weights": zeros.astype(np.float32)}
  noise = noise_spans(len(ids), rng, density, mean_span, sentinels)
  starts = noise & ~np.concatenate([[False], noise[:-1]])
  span_id = np.cumsum(starts) - 1 + sentinel_start  # each noise token's sentinel
  source = np.concatenate([np.where(starts, span_id, ids)[~noise | starts],
                           [tokenizer.eos_id]])
  # The target: for every span its sentinel, then the span's tokens.
  target = []
  for i in np.flatnonzero(noise):
    if starts[i]:
      target.append(span_id[i])
    target.append(ids[i])
  target = np.array(target + [tokenizer.eos_id], np.int32)
  source, source_mask = _padded(source, seq_len, tokenizer.pad_id)
  inputs, target_mask = _padded(np.concatenate([[tokenizer.bos_id], target[:-1]]), seq_len,
                                tokenizer.pad_id)
  targets, _ = _padded(target, seq_len, tokenizer.pad_id)
  return {"source": source, "source_segment_ids": source_mask, "inputs": inputs,
          "targets": targets, "segment_ids": target_mask,
          "weights": target_mask.astype(np.float32)}
