"""The command line's model and data selection, like TRL's ``ModelConfig`` and ``ScriptArguments``:
``ModelArguments`` (which model, how to load it, LoRA and quantization) and ``ScriptArguments``
(which data, which splits). Plain dataclasses that ``transformers.HfArgumentParser`` reads from
YAML and ``--key value`` pairs, each validating itself in ``__post_init__``; the trainer's own
settings are ``training.config.MallowsPOConfig``.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from mallowspo.training.data import load_preference_dataset

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to load and how (the command line's model section, like TRL's ``ModelConfig``)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local directory or Hugging Face hub id of a causal LM."}
    )
    dtype: str = field(
        default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16 (alias: torch_dtype)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."})
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (e.g. q_proj v_proj, or all-linear); default: peft's."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter (e.g. embed_tokens lm_head)."},
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "Rank-stabilised LoRA: scale the adapter by lora_alpha/sqrt(r), not /r."}
    )
    use_dora: bool = field(
        default=False, metadata={"help": "DoRA: a learned magnitude per output and LoRA for the direction."}
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Load the base model in 8 bits (bitsandbytes, a CUDA GPU; needs use_peft)."}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Load the base model in 4 bits, QLoRA (bitsandbytes, a CUDA GPU; needs use_peft)."},
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit quantization type: nf4 or fp4."})
    use_bnb_nested_quant: bool = field(
        default=False, metadata={"help": "Quantize the 4-bit quantization constants too (double quantization)."}
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ValueError(
                "model_name_or_path is required: pass --model_name_or_path PATH_OR_HUB_ID or set it in the recipe"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        lora = (self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target_modules, self.lora_modules_to_save)
        lora_changed = lora != (16, 32, 0.05, None, None) or self.use_rslora or self.use_dora
        if lora_changed and not self.use_peft:
            logger.warning("LoRA options are set but use_peft is false: training all weights, LoRA options ignored")
        if self.use_peft and importlib.util.find_spec("peft") is None:
            raise ValueError("use_peft needs the peft package: pip install 'mallowspo[peft]'")
        if self.use_peft and not (self.lora_r > 0 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1):
            raise ValueError("LoRA needs lora_r > 0, lora_alpha > 0 and 0 <= lora_dropout < 1")
        self._check_quantization()

    @property
    def quantization_bits(self) -> int | None:
        """4 or 8 with ``load_in_4bit`` / ``load_in_8bit``, else None."""
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None

    def _check_quantization(self) -> None:
        """Raise ValueError for a bitsandbytes setting that cannot run here; warn for 4-bit options without it."""
        four_bit_changed = (self.bnb_4bit_quant_type, self.use_bnb_nested_quant) != ("nf4", False)
        if four_bit_changed and not self.load_in_4bit:
            logger.warning("bnb_4bit_quant_type / use_bnb_nested_quant are set but load_in_4bit is false: ignored")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type must be nf4 or fp4, got {self.bnb_4bit_quant_type!r}")
        bits = self.quantization_bits
        if bits is None:
            return
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both set: choose one")
        if not self.use_peft:
            raise ValueError(
                f"load_in_{bits}bit needs use_peft true: a quantized model is trained through a LoRA adapter; set "
                f"--use_peft true, or drop load_in_{bits}bit to train all weights"
            )
        if not torch.cuda.is_available():
            raise ValueError(
                f"load_in_{bits}bit quantizes the model with bitsandbytes, which needs a CUDA GPU, and this machine "
                f"has none; drop load_in_{bits}bit (LoRA trains unquantized on CPU), or run on a GPU machine"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"load_in_{bits}bit needs the bitsandbytes package: pip install bitsandbytes")

    def quantization_config(self):
        """A ``transformers.BitsAndBytesConfig`` for ``load_in_4bit`` / ``load_in_8bit`` (TRL's
        ``get_quantization_config``), or None. 4-bit computes in ``dtype`` (float32 for auto)."""
        from transformers import BitsAndBytesConfig

        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        if not self.load_in_4bit:
            return None
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=None if self.dtype == "auto" else getattr(torch, self.dtype),
            bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=self.use_bnb_nested_quant,
        )

    def init_kwargs(self, model_init_kwargs: dict | None = None) -> dict:
        """``from_pretrained`` keyword arguments: TRL's ``model_init_kwargs`` plus, with
        ``load_in_4bit`` / ``load_in_8bit``, the ``quantization_config`` (set in one place only, as TRL requires)."""
        kwargs = dict(model_init_kwargs or {})
        quantization = self.quantization_config()
        if quantization is None:
            return kwargs
        if "quantization_config" in kwargs:
            raise ValueError(
                f"load_in_{self.quantization_bits}bit and model_init_kwargs' quantization_config both quantize the "
                "model: keep one"
            )
        return {**kwargs, "quantization_config": quantization}

    def peft_config(self):
        """A ``peft.LoraConfig`` for a causal LM (TRL's ``get_peft_config``), or None without ``use_peft``."""
        if not self.use_peft:
            return None
        from peft import LoraConfig

        return LoraConfig(
            task_type="CAUSAL_LM",
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
            modules_to_save=self.lora_modules_to_save,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
        )


@dataclass
class ScriptArguments:
    """Which data to train on (the command line's data section, like TRL's ``ScriptArguments``)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Preference data: a local JSON/JSONL/Parquet file or directory, or a hub id (alias: dataset_path)."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None,
        metadata={
            "help": "Split to evaluate on: of dataset_name (a directory or hub id; a single file has only 'train'), "
            "or of eval_dataset_name (default there: 'test'); none by default."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Separate evaluation data: a file (its one split), a directory or a hub id; none by default."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration (subset) of a hub dataset (TRL's); e.g. 'default'."}
    )
    test_split_size: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this share (< 1) or number (>= 1) of the training rows as evaluation data, drawn with "
            "the seed (TRL's); instead of dataset_test_split / eval_dataset_name."
        },
    )
    dataset_streaming: bool = field(
        default=False, metadata={"help": "TRL's streaming datasets; refused (the reference pass caches every row)."}
    )
    ignore_bias_buffers: bool = field(
        default=False, metadata={"help": "Let DDP ignore boolean buffers (TRL's workaround for some models)."}
    )

    def __post_init__(self) -> None:
        if not self.dataset_name:
            raise ValueError("dataset_name is required: pass --dataset_name PATH_OR_HUB_ID or set it in the recipe")
        if self.dataset_streaming:
            raise ValueError(
                "dataset_streaming=true is not supported: the reference pass scores and caches every row of a split "
                "before training, so the split must be a regular (map-style) dataset"
            )
        if self.test_split_size is not None:
            if not (self.test_split_size > 0 and math.isfinite(self.test_split_size)):
                raise ValueError(
                    f"test_split_size must be a share in (0, 1) or a row count >= 1, got {self.test_split_size}"
                )
            if self.dataset_test_split is not None or self.eval_dataset_name is not None:
                raise ValueError(
                    "test_split_size holds out evaluation rows from the training data, and dataset_test_split / "
                    "eval_dataset_name name other evaluation data: set one of them"
                )

    @property
    def evaluates(self) -> bool:
        """Whether the run has evaluation data."""
        return self.eval_dataset_name is not None or self.dataset_test_split is not None or self.held_out

    @property
    def held_out(self) -> bool:
        """Whether the evaluation rows are held out of the training data (``test_split_size``)."""
        return self.test_split_size is not None

    def load_splits(self, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
        """(train, eval or None) raw preference rows, as these arguments select them; with
        ``test_split_size``, eval is a seeded random share of the training rows, removed from train."""
        train = load_preference_dataset(self.dataset_name, self.dataset_train_split, self.dataset_config)
        if self.held_out:
            size = self.test_split_size if self.test_split_size < 1 else int(self.test_split_size)
            if isinstance(size, int) and size >= len(train):
                raise ValueError(f"test_split_size={size} leaves no training rows: the data has {len(train)}")
            parts = train.train_test_split(test_size=size, seed=seed)
            return parts["train"], parts["test"]
        if not self.evaluates:
            return train, None
        source, split = self.eval_source()
        config_name = self.dataset_config if source == self.dataset_name else None
        return train, load_preference_dataset(source, split, config_name)

    def eval_source(self) -> tuple[str, str]:
        """(source, split) of the evaluation data: eval_dataset_name, else dataset_name's dataset_test_split."""
        if self.eval_dataset_name is None:
            return self.dataset_name, self.dataset_test_split
        if Path(self.eval_dataset_name).expanduser().is_file():
            return self.eval_dataset_name, "train"  # a file's one split
        return self.eval_dataset_name, self.dataset_test_split or "test"
