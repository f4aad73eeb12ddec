"""Labelled files read into split examples (config.data.format = labelled; lm/data/builders.py
builds them): `<split>.tsv` / `.csv` tables with a header, or JSON Lines records (a folder
of `<split>.jsonl` files, or one `.jsonl` file split by validation_fraction /
test_fraction). Records: {"text", "label" (class id), "value" (the label as a number, NaN
if it is not one)}; class names are the training file's labels, or 0..max for integers."""

import csv
import io
import json
import os
import re

from lm.data import corpus as corpus_lib
from lm.data import source_files
from lm.errors import UserError


def labelled_examples(data_config):
  folder = os.path.abspath(data_config.path)
  if os.path.isfile(folder) and folder.endswith(".jsonl"):
    files = {"all": folder}
  else:
    files = source_files.split_files(folder, r"(.+)\.(?:tsv|csv|jsonl)")
  checksums, rows = {}, {}
  for split, path in files.items():
    data = source_files.read_bytes(path)
    checksums[path] = source_files.md5(data)
    read = _read_json_lines if path.endswith(".jsonl") else _read_table
    rows[split] = read(path, corpus_lib.decode_utf8(data, path), data_config)
  if "all" in rows:  # one file: a seeded split by the fractions
    rows = source_files.seeded_split(rows.pop("all"), data_config.validation_fraction,
                        data_config.test_fraction, 0, f"config.data.path: {folder}")
    files = {split: folder for split in rows}
  raw_labels = sorted({label for split in rows.values() for _, label, _ in split})
  if all(re.fullmatch(r"-?\d+", label) for label in raw_labels):
    names = tuple(str(i) for i in range(max(int(x) for x in raw_labels) + 1))
    to_id = {label: int(label) for label in raw_labels}
    if any(int(x) < 0 for x in raw_labels):
      raise UserError(f"config.data.label_column: negative labels in {folder}")
  else:
    names = tuple(sorted({label for _, label, _ in rows["train"]}))
    to_id = {name: i for i, name in enumerate(names)}
    for split, table in rows.items():
      for line, label, _ in table:
        if label not in to_id:
          raise UserError(f"config.data.label_column: {files[split]} line {line}: label "
                          f"{label!r} does not occur in the training file")
  examples = {split: [(f"{split}/{line}", {"text": text, "label": to_id[label],
                                           "value": _number(label)})
                      for line, label, text in table] for split, table in rows.items()}
  return folder, checksums, examples, names


def _number(label):
  try:
    return float(label)
  except ValueError:
    return float("nan")


def _read_json_lines(path, text, data_config):
  """[(line number, label string, text)] from JSON Lines records with a label field
  (data.label_column) and a text field (data.text_column, by default text/sentence/content)."""
  label_key = data_config.label_column
  text_keys = ((data_config.text_column,) if data_config.text_column
               else ("text", "sentence", "content"))
  out = []
  for line, raw in enumerate(text.split("\n"), 1):
    if not raw.strip():
      continue
    try:
      record = json.loads(raw)
    except json.JSONDecodeError as e:
      raise UserError(f"config.data.path: {path} line {line}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or label_key not in record:
      raise UserError(f"config.data.label_column: {path} line {line} has no field "
                      f"{label_key!r}")
    key = next((k for k in text_keys if k in record), None)
    if key is None or not isinstance(record[key], str):
      raise UserError(f"config.data.text_column: {path} line {line} has no text field "
                      f"({' / '.join(text_keys)})")
    label = str(record[label_key]).strip()
    if not label:
      raise UserError(f"config.data.label_column: {path} line {line} has an empty label")
    out.append((line, label, record[key]))
  if not out:
    raise UserError(f"config.data.path: {path} holds no records")
  return out


def _read_table(path, text, data_config):
  """[(line number, label string, text)] from a TSV/CSV file with a header line."""
  delimiter = "\t" if path.endswith(".tsv") else ","
  reader = csv.reader(io.StringIO(text), delimiter=delimiter,
                      quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
  header = next(reader, None)
  if not header:
    raise UserError(f"config.data.path: {path} is empty")
  header = [h.strip() for h in header]
  label_col = data_config.label_column
  if label_col not in header:
    raise UserError(f"config.data.label_column: {path} has no column {label_col!r} "
                    f"(its header: {', '.join(header)})")
  text_col = data_config.text_column
  if not text_col:
    others = [h for h in header if h != label_col]
    text_col = next((h for h in ("text", "sentence", "content") if h in others),
                    others[0] if len(others) == 1 else None)
    if text_col is None:
      raise UserError(f"config.data.text_column: {path} has several text-like columns "
                      f"({', '.join(others)}); name one")
  elif text_col not in header:
    raise UserError(f"config.data.text_column: {path} has no column {text_col!r} "
                    f"(its header: {', '.join(header)})")
  li, ti = header.index(label_col), header.index(text_col)
  out = []
  for row in reader:
    line = reader.line_num
    if not row or row == [""]:
      continue
    if len(row) != len(header):
      raise UserError(f"config.data.path: {path} line {line} has {len(row)} fields, the "
                      f"header has {len(header)}")
    label = row[li].strip()
    if not label:
      raise UserError(f"config.data.label_column: {path} line {line} has an empty label")
    out.append((line, label, row[ti]))
  if not out:
    raise UserError(f"config.data.path: {path} has a header but no rows")
  return out
