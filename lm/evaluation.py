"""Evaluating a training run's parameters: periodic and final metrics, BLEU, a sample.

lm/loop.py calls these between and after train steps: `eval_metrics` on a split (the
task's metrics), `final_evaluations` at the end of a run (the best checkpoint's scores for
tasks; the whole validation and test splits; BLEU and chrF for translation), and
`sample_text` for language models.
"""

import jax

from lm import decode, metrics, sharding


def eval_metrics(trainer, data, config, params, split, max_batches):
  task = trainer.task
  batches = data.eval_batches(split, config.train.batch_size, config.data.seq_len,
                              jax.process_index(), jax.process_count(),
                              batching=task.batching, seed=config.train.seed)
  if max_batches and task.token_scored:
    batches = batches[:max_batches]
  result = trainer.evaluate(params, data.iterator(batches))
  if (task.per_character and not (max_batches and len(batches) >= max_batches)
      and data.streams[split].characters):
    # Every target's loss, document ends included, per character of the split's text: a
    # figure that compares models with different vocabularies.
    result["nats_per_char"] = result["loss"] * result["tokens"] / data.streams[split].characters
  return result


def describe(result):
  return " | ".join(f"{k} {v:.4f}" for k, v in result.items()
                    if k not in ("tokens", "examples"))


def final_evaluations(trainer, data, config, state, best, best_checkpointer, writer, step,
                       last_validation):
  """Language models: the last step's parameters on the whole validation and test splits.
  Tasks: the best checkpoint's (already evaluated on validation), on test too."""
  params = state.params
  final = {}
  if trainer.task.token_scored and last_validation is not None:
    final["validation"] = last_validation
  if not trainer.task.token_scored and best is not None:
    final["validation"] = best["validation"]
    if best["step"] != step:
      params = best_checkpointer.restore_params(best["step"], sharding.abstract_like(
          trainer.abstract_state.params, trainer.state_shardings.params))
    metrics.log(f"best validation (step {best['step']}): {describe(best['validation'])}")
  for split in ("validation", "test"):
    if data.size(split) < (2 if data.streams else 1) or (
        split in final and not trainer.task.token_scored):
      continue
    prefix = "eval" if split == "validation" else "test"
    if split not in final:
      final[split] = eval_metrics(trainer, data, config, params, split, 0)
      if split == "validation" and config.task.eval_generate:
        final[split].update({f"generate_{k}": v for k, v in generation_scores(
            trainer, data, config, params, step).items() if k != "count"})
      writer.write(step, {f"{prefix}/{k}": v for k, v in final[split].items()
                          if k not in ("tokens", "examples")})
    if trainer.task.translates:
      final[split].update(translation_scores(trainer, data, config, params, split))
      writer.write(step, {f"{prefix}/{k}": final[split][k] for k in ("bleu", "chrf")})
      scored = final[split]["sentences"]
      which = (f"all {scored:,}" if scored == data.size(split) else
               f"{scored:,} of {data.size(split):,}")
      metrics.log(f"final {split}: BLEU {final[split]['bleu']:.2f} | chrF "
                  f"{final[split]['chrf']:.2f} over {which} sentences "
                  f"(beam {config.task.beam_size}, length penalty "
                  f"{config.task.length_penalty})")
    if trainer.task.token_scored:
      per_char = (f" | {final[split]['nats_per_char']:.4f} nats per character"
                  if "nats_per_char" in final[split] else "")
      accuracy = (f" | accuracy {final[split]['accuracy']:.4f}"
                  if "accuracy" in final[split] else "")
      kind = trainer.task.token_kind
      metrics.log(f"final {split}: loss {final[split]['loss']:.4f} | perplexity "
                  f"{final[split]['perplexity']:.2f}{accuracy} over all "
                  f"{int(final[split]['tokens']):,} {kind}tokens"
                  f"{per_char}")
      generated = {k: v for k, v in final[split].items() if k.startswith("generate_")}
      if generated:
        metrics.log(f"final {split}: {config.task.eval_generate} by generation on "
                    f"{config.task.eval_data}: {describe(generated)}")
    else:
      metrics.log(f"{split} (step {best['step'] if best else step}): "
                  f"{describe(final[split])} over all {final[split]['examples']:,} examples")
  return final


def generation_scores(trainer, data, config, params, step):
  """lm/evaluate.py's scores of the model as it is (config.task.eval_generate on
  task.eval_data): answers decoded with the cached decoder from the servable parameters."""
  from lm import evaluate, inference  # pylint: disable=import-outside-toplevel
  t = config.task
  rows = evaluate.read_rows(t.eval_generate, t.eval_data, config.data.source_language,
                            config.data.target_language)[:t.eval_limit]
  served = jax.tree.map(lambda x: x.addressable_shards[0].data, _servable(trainer, params))
  loaded = inference.Loaded(model=trainer.model, params=served, tokenizer=data.tokenizer,
                            config=config, step=step, mesh=trainer.mesh)
  labels = tuple(x for x in t.eval_labels.split(",") if x)
  return evaluate.evaluate(loaded, t.eval_generate, rows, t.eval_max_tokens,
                           config.train.batch_size, labels=labels,
                           target_language=config.data.target_language)


def harness_due(config, step):
  """Whether the evaluation after `step` runs config.eval.harness_tasks."""
  e = config.eval
  return bool(e.harness_tasks) and (not e.harness_every or step % e.harness_every == 0
                                    or step == config.train.num_steps)


def harness_scores(trainer, data, config, params, step):
  """lm-evaluation-harness's scores of the model as it is (config.eval.harness_tasks), on
  the run's mesh: {"<task>/<metric>": value}."""
  from lm import harness, inference  # pylint: disable=import-outside-toplevel
  e = config.eval
  loaded = inference.Loaded(model=trainer.model, params=_servable(trainer, params),
                            tokenizer=data.tokenizer, config=config, step=step,
                            mesh=trainer.mesh)
  model = harness.HarnessModel(loaded=loaded, batch_size=config.train.batch_size)
  result = harness.run(model, [t.strip() for t in e.harness_tasks.split(",")],
                       limit=e.harness_limit or None,
                       num_fewshot=None if e.harness_num_fewshot < 0 else e.harness_num_fewshot,
                       data_dir=e.harness_data or None,
                       gen_kwargs=({"max_gen_toks": e.harness_max_tokens}
                                   if e.harness_max_tokens else None))
  return {f"{task}/{metric}": value for task, scores in result.items()
          for metric, value in scores.items()}


def translation_scores(trainer, data, config, params, split):
  """BLEU and chrF of the split's sources translated by beam search (lm/translate.py)."""
  from lm import translate  # pylint: disable=import-outside-toplevel
  records = data.prepared.sources[split]
  count = min(len(records), config.task.bleu_sentences or len(records))
  pairs = [(records[i]["source"], records[i]["target"]) for i in range(count)]
  served = _servable(trainer, params)
  with trainer.on_mesh():
    hypotheses = translate.translate(
        trainer.model, served, data.tokenizer, [p[0] for p in pairs], config.data.seq_len,
        config.data.seq_len, config.task.beam_size, config.task.length_penalty,
        config.train.batch_size)
  return {**translate.scores(hypotheses, [p[1] for p in pairs]), "sentences": count}


def _servable(trainer, params):
  """The parameters as decoding reads them (LoRA merged, frozen parts joined), replicated."""
  return jax.jit(trainer.servable_params,
                 out_shardings=sharding.replicated(trainer.mesh))(params)


def sample_text(config, data, trainer, state, writer, step):
  prompt = config.sample.prompt
  prompt_ids = data.tokenizer.prompt_ids(prompt)
  # One device's copy of the replicated parameters: no host round trip, and generate's
  # windows (a prefill and a decode each) reuse it instead of uploading host arrays.
  params = jax.tree.map(lambda x: x.addressable_shards[0].data,
                        _servable(trainer, state.params))
  ids = decode.generate(trainer.model, params, [prompt_ids],
                        config.sample.num_tokens,
                        decode.Sampling(temperature=config.sample.temperature,
                                        top_k=config.sample.top_k, seed=config.train.seed))
  sample = prompt + data.tokenizer.decode(ids[0])
  writer.write_text(step, "sample", sample)
  metrics.log(f"sample (temperature {config.sample.temperature}, top-k "
              f"{config.sample.top_k}):\n{sample}")
  return sample
