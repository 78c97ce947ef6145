"""The `sft` stage: supervised fine-tuning with LoRA or another PEFT method, on TRL's `SFTTrainer`.

Inputs: `model` (a model directory or a hub id) and optionally `data` in one of TRL's standard formats
(prompt/completion or messages, conversational or plain, or plain `text`); without `data` it trains on
the task's SFT examples (`Task.sft_examples`). The loss is on the completions / assistant turns only by
default. With a task, the metrics end with its held-out pass rate (`task_eval`).

Output: an adapter directory (adapter weights, tokenizer with chat template, `base.json`) for the PEFT
methods, a full model directory for `freeze` and `full`. Checkpoints go to `out_dir/scratch/`; a rerun
after a crash continues from the last complete one.

Reads top to bottom: check, load, train, save, measure.
"""

from __future__ import annotations

import importlib.util
import json
import re
import resource
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

import tasks
from common.configs import lora_config
from common.data import Row, load_sft, sft_examples
from common.models import (
    compute_dtype,
    has_generation_markers,
    is_adapter,
    load_tokenizer,
    pick_device,
    save_model,
    set_threads,
    tokenizer_summary,
)
from common.outcomes import InputError
from common.sources import split_revision
from common.training import (
    SCRATCH,
    count_parameters,
    final_train_loss,
    last_checkpoint,
    set_loss_chunk,
    trainer_arguments,
)
from policy.configs import SFTConfig

ADAPTER_METHODS = ("lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning")


def run(config: SFTConfig, inputs: dict[str, Path | str], out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()

    # Check: everything that can be told without loading the model
    device = pick_device(config.device)
    check_method(config, device)
    task = tasks.load(config.task) if config.task is not None else None
    if config.task_eval and task is None:
        raise InputError("sft: task_eval needs a task (the workflow's top-level `task:` or this stage's)")
    source = inputs["model"]
    if is_adapter(source):
        raise InputError(
            f"sft: the model {source} is an adapter; merge it into its base first (rlhf export) to train on it"
        )
    dataset, data_format = load_data(inputs.get("data"), task)
    train_set, eval_set = split(dataset, config)
    tokenizer = load_tokenizer(source, config.pad_token)
    check_tokenizer(tokenizer, data_format, config)
    masking = loss_mask(tokenizer, data_format, config)
    if masking.startswith("assistant turns (found"):
        train_set = with_assistant_masks(train_set, tokenizer)
        eval_set = with_assistant_masks(eval_set, tokenizer) if eval_set is not None else None
    set_threads(config.cpu_threads)

    # Load
    memory = PeakMemory(device)
    model = load_model(source, config, device)

    # Train
    scratch = out_dir / SCRATCH
    trainer = build_trainer(config, model, tokenizer, train_set, eval_set, masking, device, scratch)
    trainable, total = count_parameters(trainer.model)
    checkpoint = last_checkpoint(scratch)
    resumed_from, tokens_before = None, 0
    if checkpoint is not None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        resumed_from, tokens_before = state["global_step"], state.get("num_input_tokens_seen", 0)
        print(f"sft: resuming from step {resumed_from} ({checkpoint.name})", flush=True)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    tokens = trainer.state.num_input_tokens_seen - tokens_before
    eval_loss = trainer.evaluate()["eval_loss"] if eval_set is not None else None
    peak_mb, peak_method = memory.peak_mb()

    # Save
    model = trainer.model
    save_model(model, tokenizer, out_dir, base=source if config.method in ADAPTER_METHODS else None)

    # Measure
    measured: dict[str, Any] = {}
    if task is not None and (config.task_eval or (config.task_eval is None and "data" not in inputs)):
        from policy.evaluate import task_pass_rates

        measured = task_pass_rates(model, tokenizer, task, config.task_eval_samples, config.seed)
    return {
        **measured,
        "train_loss": final_train_loss(trainer, result.training_loss),
        "eval_loss": eval_loss,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_fraction": trainable / total,
        "method": config.method,
        "data_format": data_format,
        "loss_on": masking,
        "tokenizer": tokenizer_summary(tokenizer),
        "train_examples": len(train_set),
        "eval_examples": len(eval_set) if eval_set is not None else 0,
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed_from,
        "train_tokens": tokens,
        "tokens_per_second": tokens / result.metrics["train_runtime"],
        "train_seconds": result.metrics["train_runtime"],
        "peak_memory_mb": peak_mb,
        "peak_memory_method": peak_method,
        "device": str(device),
        "duration_seconds": time.perf_counter() - started,
    }


# --- check ---


def check_method(config: SFTConfig, device: torch.device) -> None:
    if config.method != "qlora":
        return
    if device.type != "cuda":
        raise InputError(
            f"sft: method qlora quantizes the base model to 4 bits with bitsandbytes, which needs a CUDA GPU; "
            f"this run is on {device.type}. Use method: lora (the same adapter on an unquantized base)."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError("sft: method qlora needs the bitsandbytes package (pip install bitsandbytes)")


def check_tokenizer(tokenizer: Any, data_format: str, config: SFTConfig) -> None:
    conversational = data_format.endswith("(conversational)")
    if conversational and not tokenizer.chat_template:
        raise InputError(
            f"sft: the data is conversational ({data_format}) but the tokenizer has no chat template"
        )


def loss_mask(tokenizer: Any, data_format: str, config: SFTConfig) -> str:
    """Which tokens the loss is on (recorded in the manifest)."""
    if data_format.startswith("text") or not config.completion_only_loss:
        return "every token"
    if data_format.startswith("prompt/completion"):
        return "completion"
    if has_generation_markers(tokenizer):
        return "assistant turns (the chat template's generation markers)"
    return "assistant turns (found by rendering each conversation up to each assistant turn)"


def with_assistant_masks(dataset: Dataset, tokenizer: Any) -> Dataset:
    """`messages` data tokenized with the chat template, and an `assistant_masks` column that is 1 on the
    tokens of every assistant turn (its end-of-turn token included), for templates without `{% generation
    %}` markers. A turn's tokens are those between the conversation rendered up to it with the assistant
    turn opened and the conversation rendered through it; a template whose renderings are not prefixes of
    one another (one that rewrites earlier turns) cannot be masked this way and is an error."""

    def render(messages: list[dict[str, Any]], opened: bool = False) -> list[int]:
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=opened, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    def encode(example: dict[str, Any]) -> dict[str, list[int]]:
        messages = example["messages"]
        ids = render(messages)
        mask = [0] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = render(messages[:turn], opened=True), render(messages[: turn + 1])
            if ids[: len(before)] != before or ids[: len(through)] != through:
                raise InputError(
                    "sft: this chat template renders a conversation differently from its beginning (it rewrites "
                    "earlier turns), so the assistant's tokens cannot be found; use prompt/completion data or "
                    "set completion_only_loss: false"
                )
            mask[len(before) : len(through)] = [1] * (len(through) - len(before))
        return {"input_ids": ids, "assistant_masks": mask}

    return dataset.map(encode, remove_columns=dataset.column_names)


# --- load ---


def load_data(data: Path | str | None, task: tasks.Task | None) -> tuple[Dataset, str]:
    """The SFT data (`common.data.load_sft`) and its format; the task's SFT examples when `data` is None."""
    if data is None and task is None:
        raise InputError(
            "sft: no `data` input and no task to take SFT examples from; give data, or a task (the workflow's "
            "top-level `task:`, e.g. `task: {name: arithmetic}`, or the stage's `task`)"
        )
    if data is None:
        assert task is not None
        rows = [Row(f"task {task.name} example {n}", e) for n, e in enumerate(task.sft_examples(), 1)]
        examples, data_format = sft_examples(rows, "sft")
    else:
        examples, data_format = load_sft(data, "sft")
    return Dataset.from_list(examples), data_format


def split(dataset: Dataset, config: SFTConfig) -> tuple[Dataset, Dataset | None]:
    """(train, eval): `eval_examples` drawn with the seed, at most a fifth of the data."""
    size = min(config.eval_examples, len(dataset) // 5)
    if size == 0:
        return dataset, None
    parts = dataset.train_test_split(test_size=size, seed=config.seed)
    return parts["train"], parts["test"]


def load_model(source: Path | str, config: SFTConfig, device: torch.device) -> Any:
    """The model to train: fp32 for `freeze`/`full` (mixed precision keeps fp32 master weights), the
    `precision`'s dtype under adapters, 4-bit for `qlora`."""
    from transformers import AutoModelForCausalLM

    adapter = config.method in ADAPTER_METHODS
    kwargs: dict[str, Any] = {
        "dtype": compute_dtype(config.precision, device, source) if adapter else torch.float32
    }
    if config.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
        kwargs["device_map"] = {"": device.index or 0}
    name, revision = split_revision(source)
    model = AutoModelForCausalLM.from_pretrained(name, revision=revision, **kwargs)
    if config.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    if config.method == "freeze":
        freeze_all_but_last_blocks(model, config.trainable_blocks)
    return model


def freeze_all_but_last_blocks(model: Any, keep: int) -> None:
    """Freeze every weight except those of the last `keep` transformer blocks."""
    layers = getattr(model.config, "num_hidden_layers", None)
    blocks = next(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers), None
    )
    if blocks is None:
        raise InputError(
            f"sft: method freeze cannot find the {layers} transformer blocks of {type(model).__name__}"
        )
    if keep > len(blocks):
        raise InputError(f"sft: trainable_blocks is {keep}, but the model has only {len(blocks)} blocks")
    model.requires_grad_(False)
    for block in blocks[len(blocks) - keep :]:
        block.requires_grad_(True)


def peft_config(config: SFTConfig) -> Any:
    """The PEFT configuration of an adapter method; None for `freeze` and `full`."""
    import peft

    task = "CAUSAL_LM"
    if config.method in ("lora", "dora", "qlora"):
        return lora_config(config, task, use_dora=config.method == "dora")
    if config.method == "ia3":
        return peft.IA3Config(task_type=task)
    if config.method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=config.virtual_tokens)
    if config.method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=config.virtual_tokens)
    return None


# --- train ---


def build_trainer(
    config: SFTConfig,
    model: Any,
    tokenizer: Any,
    train_set: Dataset,
    eval_set: Dataset | None,
    masking: str,
    device: torch.device,
    scratch: Path,
) -> Any:
    """TRL's `SFTTrainer` on `model` with the stage's arguments, adapter and loss chunks (also what
    `bench/lora_memory.py` measures)."""
    from trl import SFTTrainer

    set_loss_chunk(config.loss_chunk_size, device)
    return SFTTrainer(
        model=model,
        args=training_args(config, masking, device, scratch, model),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=peft_config(config),
    )


def training_args(
    config: SFTConfig, masking: str, device: torch.device, scratch: Path, model: Path | str | torch.nn.Module
) -> Any:
    from trl import SFTConfig as TRLConfig

    return TRLConfig(
        **trainer_arguments(config, device, scratch, model),
        per_device_eval_batch_size=config.batch_size,
        max_length=config.max_length,
        completion_only_loss=config.completion_only_loss,
        assistant_only_loss=masking.startswith("assistant turns (the chat template"),
        eval_strategy="no",  # the eval loss is measured once, at the end
        include_num_input_tokens_seen="non_padding",
    )


class PeakMemory:
    """Peak memory from now on: CUDA's max allocated on a GPU; on CPU the rise of the process's peak
    resident set size (Linux `VmHWM`, reset here through `/proc/self/clear_refs`) over its size now."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.method = "cuda_max_memory_allocated"
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "cpu_peak_rss_delta"
        except OSError:  # cannot reset the high-water mark: it covers the process's whole life
            self.method = "cpu_peak_rss_delta_since_process_start"
        self.baseline_kb = _proc_status_kb("VmRSS")

    def peak_mb(self) -> tuple[float, str]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, self.method
        peak_kb = _proc_status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak_kb - self.baseline_kb) / 1024, self.method


def _proc_status_kb(field: str) -> int:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0
