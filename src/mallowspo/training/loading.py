"""Loading a causal LM and its tokenizer, refusing what would load wrong: pickle weights, a
non-causal architecture, weights that do not match the config (missing, unexpected, resized),
unreadable files, a tokenizer beyond the embedding; hub failures in one line naming the id."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub.constants
import torch
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from mallowspo.training.data import looks_like_path

logger = logging.getLogger(__name__)


def check_model_source(name_or_path: str) -> None:
    """Raise FileNotFoundError, naming the path, when ``name_or_path`` is meant as a local
    model directory (see ``mallowspo.training.data.looks_like_path``) that is not there or holds no model.
    Hub ids ('owner/name') pass; the hub is asked only when they are loaded."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not any((path / marker).is_file() for marker in ("config.json", "adapter_config.json")):
            raise FileNotFoundError(
                f"Model directory {path} holds no config.json: it is not a saved model. Give a directory written "
                "by save_pretrained (config.json, model.safetensors, tokenizer files) or a Hugging Face hub id."
            )
    elif path.exists():
        raise FileNotFoundError(f"Model path {path} is a file; give the directory that holds the model (config.json).")
    elif looks_like_path(name_or_path):  # e.g. 'runs/model' where ./runs exists: not the hub id of an owner "runs"
        raise FileNotFoundError(
            f"Model not found: there is no directory at '{name_or_path}' (resolved to {path.resolve()}). Give a "
            "directory written by save_pretrained, or a Hugging Face hub id such as 'owner/name'."
        )


# Encoders (bidirectional attention) that AutoModelForCausalLM would load as a "decoder" all the same.
ENCODER_MODEL_TYPES = frozenset(
    {
        "albert", "bert", "big_bird", "camembert", "data2vec-text", "deberta", "deberta-v2", "distilbert",
        "electra", "ernie", "esm", "flaubert", "funnel", "ibert", "layoutlm", "megatron-bert", "mobilebert",
        "modernbert", "mpnet", "mra", "nezha", "nystromformer", "rembert", "roberta", "roberta-prelayernorm",
        "roformer", "squeezebert", "xlm", "xlm-roberta", "xlm-roberta-xl", "xmod", "yoso",
    }
)  # fmt: skip
NON_CAUSAL_HEADS = (
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForNextSentencePrediction",
    "ForPreTraining",
)


def check_causal_lm_config(config: Any, where: str) -> None:
    """Raise ValueError when ``config`` describes an encoder or a model with a non-LM head.

    The declared ``architectures`` decide first (all of them masked-LM or classification heads:
    refused); an encoder ``model_type`` (bert, roberta, ...) is refused unless ``is_decoder`` is set,
    which is what makes its attention causal. Decoder-only LMs (Llama, Qwen2, GPT-2, ...) pass.
    """
    architectures = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    is_decoder = bool(getattr(config, "is_decoder", False))
    if architectures and all(name.endswith(NON_CAUSAL_HEADS) for name in architectures):
        what = "a masked-LM or classification model"
    elif model_type in ENCODER_MODEL_TYPES and not is_decoder:
        what = "an encoder, whose attention sees the whole sequence"
    else:
        return
    raise ValueError(
        f"{where} is not a causal language model: its config.json gives architectures {architectures or 'none'}, "
        f"model_type '{model_type}', is_decoder {is_decoder}: {what}. mallowspo fine-tunes decoder-only causal "
        "LMs (Llama, Qwen2, Mistral, GPT-2, Pythia...); give the directory or hub id of one."
    )


def load_causal_lm(
    name_or_path: str,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    **init_kwargs: Any,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the command line's options, plus
    ``init_kwargs`` (TRL's ``model_init_kwargs``: revision, device_map, ...; they win).

    Weights are read from safetensors files only (``use_safetensors=True``): pickle weight
    files (``pytorch_model.bin``) can run code when loaded. Remote code runs only with
    ``trust_remote_code=True``. Refused with one line naming the directory (ValueError or
    OSError): an encoder or masked LM (``check_causal_lm_config``), an unreadable safetensors file,
    sizes in config.json that are not those of the weights, weights missing from the file (they
    would be trained from a random init: e.g. ``lm_head.weight`` with untied embeddings) or in
    the file but not in the model, and a hub id that cannot be loaded.
    """
    check_model_source(name_or_path)
    if init_kwargs.get("use_safetensors", True) is not True:
        raise ValueError(
            "model_init_kwargs use_safetensors=false is refused: mallowspo loads safetensors weights only (a pickle "
            "weight file can run code when loaded)"
        )
    if "torch_dtype" in init_kwargs:  # transformers' old name
        init_kwargs["dtype"] = init_kwargs.pop("torch_dtype")
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    kwargs.update(init_kwargs)
    trust_remote_code = kwargs["trust_remote_code"]
    config = None
    if (Path(name_or_path).expanduser() / "config.json").is_file():  # refused before the weights are read
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        check_causal_lm_config(config, name_or_path)
    with held_load_report() as report, hub_errors(name_or_path, "the model"):
        try:
            model, info = AutoModelForCausalLM.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
        except SafetensorError as error:
            raise ValueError(unreadable_weights_message(name_or_path, error)) from error
        except RuntimeError as error:  # transformers' size check (ignore_mismatched_sizes stays off)
            if "ignore_mismatched_sizes" not in str(error) and "size mismatch" not in str(error):
                raise
            shapes = config_size_mismatches(name_or_path, config)
            report.complete = bool(shapes)  # else the report above the error has the details
            raise ValueError(size_mismatch_message(name_or_path, shapes, error)) from error
        except OSError as error:
            if not any(Path(name_or_path).expanduser().glob("*.bin")):
                raise
            raise OSError(
                f"{name_or_path} holds only pickle weights (*.bin), and mallowspo loads safetensors only (a pickle "
                "file can run code when loaded). If you trust the file, convert it once: AutoModelForCausalLM."
                f"from_pretrained('{name_or_path}').save_pretrained('{name_or_path}-safetensors'), and train from "
                "the new directory."
            ) from error
        report.complete = True  # the errors below say what the report says
        check_causal_lm_config(model.config, name_or_path)  # hub ids and adapter directories: known once loaded
        check_loading_info(model, info, name_or_path)
    return model


@contextmanager
def held_load_report() -> Iterator[SimpleNamespace]:
    """Hold back transformers' loading-report warning (a table of missing, unexpected or mismatched
    weights) while a model loads. Dropped when a ValueError leaves after ``complete`` was set (it
    says the same in one line); logged after all otherwise (a success, or an error it explains)."""
    log = logging.getLogger("transformers.modeling_utils")
    held: list[logging.LogRecord] = []
    state = SimpleNamespace(complete=False)

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            held.append(record)
            return False
        return True

    log.addFilter(hold)
    try:
        yield state
    except ValueError:
        if state.complete:
            held.clear()
        raise
    finally:
        log.removeFilter(hold)
        for record in held:
            log.handle(record)


def check_loading_info(model: PreTrainedModel, info: dict[str, Any], where: str) -> None:
    """Raise ValueError when transformers' loading report (``output_loading_info=True``) has
    weights missing from the checkpoint, weights the model does not use, size mismatches or errors.

    Tied weights are not in the report, nor are the keys the model class expects to be missing
    or unused (``_keys_to_ignore_on_load_missing`` / ``_unexpected``; dropped here again)."""

    def kept(keys: Any, patterns: Any) -> list[str]:
        regex = re.compile("|".join(f"({pattern})" for pattern in patterns)) if patterns else None
        return sorted(key for key in keys or () if regex is None or regex.search(key) is None)

    missing = kept(info.get("missing_keys"), getattr(model, "_keys_to_ignore_on_load_missing", None))
    unexpected = kept(info.get("unexpected_keys"), getattr(model, "_keys_to_ignore_on_load_unexpected", None))
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched or info.get("error_msgs"):
        shapes = [
            f"{key} is {list(file)} in the file, {list(built)} by config.json" for key, file, built in mismatched
        ]
        raise ValueError(size_mismatch_message(where, shapes, "; ".join(info.get("error_msgs") or ())))
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"missing from the file: {few(missing)}, which would be trained from a random init")
        head = model.get_output_embeddings()
        head_keys = {f"{name}.weight" for name, module in model.named_modules() if head is not None and module is head}
        if head_keys & set(missing) and not getattr(model.config, "tie_word_embeddings", False):
            parts[-1] += (
                " (config.json sets tie_word_embeddings false, so the output head is not the input embedding:"
                ' if this model ties them, set "tie_word_embeddings": true)'
            )
    if unexpected:
        parts.append(f"not used by the model: {few(unexpected)} in the file, which would be ignored")
    raise ValueError(
        f"{where}: the weights in {weights_label(where)} do not match the {type(model).__name__} its config.json "
        f"describes; {'; '.join(parts)}. Use the config.json saved with these weights, or save the model again."
    )


def few(keys: list[str], shown: int = 3) -> str:
    """'N weights (a, b, c, ...)': the count and the first few keys."""
    listed = ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")
    return f"{len(keys)} weight{'s' if len(keys) != 1 else ''} ({listed})"


def safetensors_files(name_or_path: str) -> list[Path]:
    """The safetensors weight files of a local model directory (the shards of its index, if any)."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return []
    index = path / "model.safetensors.index.json"
    try:
        return [path / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    return sorted(path.glob("*.safetensors"))


def weights_label(name_or_path: str) -> str:
    files = safetensors_files(name_or_path)
    if len(files) == 1:
        return str(files[0])
    if files:
        return f"{files[0].parent} ({len(files)} safetensors files)"
    return f"'{name_or_path}'"


def unreadable_weights_message(name_or_path: str, error: Exception) -> str:
    """Name the first safetensors file that does not open, and why."""
    for file in safetensors_files(name_or_path):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as bad:
            size = file.stat().st_size if file.is_file() else 0
            return (
                f"{file} is not a readable safetensors file ({bad}; {size} bytes): it is truncated or corrupted, "
                "e.g. by an interrupted download or copy. Copy or download the model again, or save it again."
            )
    return f"the weights of {name_or_path} are not readable safetensors ({error}): download or save the model again."


def size_mismatch_message(where: str, mismatched: list[str], error: Any) -> str:
    """Name the tensors whose sizes in the file are not those config.json gives (else transformers' words)."""
    if mismatched:
        plural = "s differ" if len(mismatched) != 1 else " differs"
        detail = (
            f"{len(mismatched)} tensor{plural}: {'; '.join(mismatched[:3])}{'; ...' if len(mismatched) > 3 else ''}"
        )
    elif "above report" in str(error):  # transformers logged the tensors in its load report
        detail = "the load report above lists the tensors"
    else:
        detail = " ".join(str(error).split()).split(" You may consider adding")[0]
    return (
        f"{where}: the sizes in config.json do not match the weights in {weights_label(where)} ({detail}). "
        "Was config.json edited, or copied from another model? Use the config.json saved with these weights."
    )


def config_size_mismatches(name_or_path: str, config: Any) -> list[str]:
    """Compare the shapes in the safetensors headers with those of the model built from ``config``
    (on the meta device: no memory). Keys that do not match by name are left out."""
    if config is None:
        return []
    try:
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(config)
        expected, prefix = built.state_dict(), built.base_model_prefix
        found = []
        for file in safetensors_files(name_or_path):
            with safe_open(str(file), framework="pt") as weights:
                for key in weights.keys():
                    shape = list(weights.get_slice(key).get_shape())
                    target = key if key in expected else f"{prefix}.{key}"
                    if target in expected and list(expected[target].shape) != shape:
                        found.append(f"{key} is {shape} in the file, {list(expected[target].shape)} by config.json")
        return found
    except Exception:  # noqa: BLE001 - only a better message; transformers' own is the fallback
        return []


def hub_reason(error: BaseException) -> str:
    """A few words on why the hub did not give a model: the cause found in the exception chain."""
    chain, seen = [], error
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    reasons = (
        (GatedRepoError, "the repository is gated: accept its terms on the hub and log in"),
        (RepositoryNotFoundError, "no such repository, or it is private: log in if it is yours"),
        (RevisionNotFoundError, "no such revision"),
    )
    for kind, reason in reasons:
        if any(isinstance(item, kind) for item in chain):
            return reason
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and it is not in the local cache"
    if any(isinstance(item, (LocalEntryNotFoundError, ConnectionError, TimeoutError)) for item in chain):
        return "the hub cannot be reached and it is not in the local cache"
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


@contextmanager
def hub_errors(name_or_path: str, what: str) -> Iterator[None]:
    """Turn a failed hub download of ``name_or_path`` (not a local path) into one OSError naming it."""
    try:
        yield
    except OSError as error:
        if Path(name_or_path).expanduser().exists() or error.errno is not None:  # local, or e.g. a full disk
            raise
        raise OSError(
            f"could not load {what} '{name_or_path}' from the Hugging Face hub ({hub_reason(error)}); check the id "
            "and the network, or give a local directory"
        ) from error


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
VOCABULARY_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained`` and ``ensure_pad_token``, with one-line errors naming the
    directory and the file: no tokenizer files (FileNotFoundError), a truncated or corrupted
    tokenizer.json / tokenizer_config.json (ValueError), a hub id that cannot be loaded (OSError)."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        check_model_source(name_or_path)  # a file, or a path that is not there
        with hub_errors(name_or_path, "the tokenizer of"):
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except Exception as error:  # noqa: BLE001 - any failure on a local directory is about its files
            raise tokenizer_error(path, error) from error
    try:
        ensure_pad_token(tokenizer)
    except ValueError as error:
        missing = path.is_dir() and not (path / "tokenizer_config.json").is_file()
        hint = " (its tokenizer_config.json, which names the special tokens, is missing)" if missing else ""
        raise ValueError(f"{name_or_path}: {error}{hint}") from error
    return tokenizer


def tokenizer_error(path: Path, error: Exception) -> Exception:
    """The error to raise for a local tokenizer that did not load: which file, and what is wrong."""
    for name in TOKENIZER_JSON_FILES:
        file = path / name
        if file.is_file():
            try:
                json.loads(file.read_bytes())
            except ValueError as bad:  # JSONDecodeError, UnicodeDecodeError
                return ValueError(
                    f"{file} is not valid JSON ({bad}; {file.stat().st_size} bytes): the tokenizer file is truncated "
                    "or corrupted. Save the tokenizer again (tokenizer.save_pretrained) or copy it from the base model."
                )
    present = [name for name in (*TOKENIZER_JSON_FILES, *VOCABULARY_FILES) if (path / name).is_file()]
    if not present:
        return FileNotFoundError(
            f"{path} holds no tokenizer files (tokenizer.json, tokenizer_config.json): save the tokenizer with the "
            f"model (tokenizer.save_pretrained('{path}')) or copy its files from the base model."
        )
    if not (path / "tokenizer.json").is_file() and not set(present) & set(VOCABULARY_FILES):
        return FileNotFoundError(
            f"{path} has {', '.join(present)} but no tokenizer.json (nor a vocabulary file such as tokenizer.model "
            f"or vocab.json): copy tokenizer.json from the base model, or save the tokenizer again "
            f"(tokenizer.save_pretrained('{path}'))."
        )
    reason = " ".join(str(error).split()) or type(error).__name__
    return ValueError(
        f"could not load the tokenizer in {path} ({', '.join(present)}): {type(error).__name__}: {reason}"
    )


def check_tokenizer_fits(model: torch.nn.Module, tokenizer: Any, where: str) -> None:
    """Raise ValueError when the tokenizer can produce ids the model's input embedding has no row
    for (they would fail as an IndexError in the first forward). ``where`` names the model."""
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0]
    special = [int(i) for i in getattr(tokenizer, "all_special_ids", ()) if i is not None]
    largest = max([len(tokenizer) - 1, *special])
    if largest < rows:
        return
    specials = f", special ids up to {max(special)}" if special else ""
    raise ValueError(
        f"the tokenizer of {where} does not fit its model: it has {len(tokenizer)} tokens (largest id {largest}"
        f"{specials}) but the model's input embedding has {rows} rows. Use the "
        "tokenizer saved with this model, or resize the model for this tokenizer (model.resize_token_embeddings"
        "(len(tokenizer)), then save_pretrained)."
    )


def ensure_pad_token(tokenizer: Any) -> None:
    """Use EOS as the pad token when the tokenizer has none (padding is masked out anyway)."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token first")
    tokenizer.pad_token = tokenizer.eos_token
    logger.warning("the tokenizer has no pad token: using its EOS token %r as the pad token", tokenizer.eos_token)
