"""Adapter files: ours (adapter.safetensors + adapter.json), Hugging Face PEFT's folders, and loralib's .pt
state dicts, written atomically and read without ever failing silently.

Every bad argument or unreadable, inconsistent file raises AdapterError (one line naming the problem and the fix);
every checkpoint tensor must land in the model and every adapter tensor of the model must be in the checkpoint; a
checkpoint's alpha must match the model's (a model whose alpha was a default takes the checkpoint's, and says so).
Each method's PEFT names and config keys come from its class in peft_layers.METHOD_CLASSES.

Public: save_adapter, load_adapter, save_peft, load_peft, peft_config (all re-exported by peft_layers, where
users import them from).
"""
import json
import logging
import math
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["save_adapter", "load_adapter", "save_peft", "load_peft", "peft_config"]

logger = logging.getLogger("peft_layers")  # the adapter module's logger, as before the split
PathLike = str | os.PathLike


def _to_saveable(sd):
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_adapter(model: nn.Module, path: PathLike) -> Path:
    """Write `path/adapter.safetensors` (adapter + modules_to_save + projections) and `path/adapter.json`."""
    cfg = _config_of(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = _to_saveable(adapter_state_dict(model))
    meta = dict(cfg, format="peft_layers/1", shapes={k: list(v.shape) for k, v in sd.items()})
    _atomic(path / ADAPTER_FILE, lambda tmp: save_file(sd, tmp))
    _atomic(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return path


def _atomic(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _strip_prefixes(sd, model):
    """Map checkpoint keys onto model names: drop DDP's `module.` and PEFT's `base_model.model.`."""
    names = set(dict(model.named_parameters())) | set(dict(model.named_buffers()))
    out = {}
    for k, v in sd.items():
        key = k
        for prefix in ("module.", "base_model.model.", "base_model."):
            if key not in names and key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = v
    return out


def _read_json(path):
    """A JSON object from an adapter config; every way it can be unreadable is one AdapterError."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"adapter config {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise AdapterError(f"adapter config {path} is not UTF-8 text (byte {e.start}): is it the right file?") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"adapter config {path} is not valid JSON (line {e.lineno}: {e.msg}); re-save the "
                           "adapter") from None
    except OSError as e:
        raise AdapterError(f"cannot read adapter config {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"adapter config {path} holds a JSON {type(data).__name__}, not an object")
    return data


def _read_safetensors(path):
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise AdapterError(f"adapter weights {path} do not exist") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"adapter weights {path} are not a readable safetensors file (truncated or corrupt: "
                           f"{_one_line(e)}); re-save or re-download them") from None


def _read_pt(path):
    """A loralib/PyTorch state dict, loaded with weights_only=True: tensors and plain containers, nothing else."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdapterError(f"adapter checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as e:
        if "unsupported global" not in str(e).lower():  # not a refused object: bytes that are no valid pickle
            raise AdapterError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt pickle data); "
                               "re-save or re-download it") from None
        # torch's own message advises weights_only=False, which would run code from the file: not repeated here
        raise AdapterError(f"{path} holds objects other than tensors and plain containers, which this toolkit does "
                           "not unpickle; save only the state dict (torch.save(lora_state_dict(model), path)) or "
                           "convert it to safetensors") from None
    except (EOFError, OSError, RuntimeError, ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt: "
                           f"{_one_line(e)})") from None
    if not isinstance(sd, dict):
        raise AdapterError(f"{path} holds a {type(sd).__name__}, not a state dict of tensors")
    sd = sd.get("model_state_dict", sd.get("state_dict", sd))
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise AdapterError(f"{path} is not a state dict of named tensors")
    return sd


def _one_line(e):
    text = " ".join(str(e).split())
    return (text[:160] + "...") if len(text) > 160 else (text or type(e).__name__)


def _meta_value(meta, key, source):
    if key not in meta:
        raise AdapterError(f"adapter config {source} lacks {key!r}; re-save the adapter")
    return meta[key]


def _load_tensors(model, sd, source, alpha=None):
    """Copy every tensor of `sd` into the model; any key, rank or shape that does not fit raises AdapterError."""
    layers = dict(adapter_layers(model))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    problems = []
    for key, tensor in sd.items():
        layer_name, _, pn = key.rpartition(".")
        target = params.get(key, buffers.get(key))
        if target is None:
            problems.append(f"checkpoint tensor {key} has no place in the model")
            continue
        if tuple(target.shape) != tuple(tensor.shape):
            layer = layers.get(layer_name)
            ck_rank = None if layer is None else layer.checkpoint_rank(pn, tensor)
            if ck_rank is not None:
                if ck_rank != layer.r:
                    problems.append(f"checkpoint has rank {ck_rank} for {layer_name}, model has rank {layer.r}")
                    continue
            problems.append(f"shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)}")
        elif not tensor.is_floating_point():
            problems.append(f"checkpoint tensor {key} is {tensor.dtype}, not floating point")
        elif not bool(torch.isfinite(tensor).all()):
            problems.append(f"checkpoint tensor {key} holds NaN or infinite values")
    expected = {f"{n}.{pn}" for n, layer in layers.items() for pn in layer.adapter_names()}
    missing = sorted(expected - set(sd))
    if missing:
        problems.append(f"{len(missing)} adapter tensors of the model are not in the checkpoint, e.g. {missing[0]}")
    if problems:
        raise AdapterError(f"{source} does not fit this model: " + "; ".join(problems[:3])
                           + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))
    # Weights merged under the old adapter values are unmerged first, and merged again with the new ones.
    remerge = any(layer.merged for layer in layers.values()) or not model.training
    unmerge_adapter(model)
    _take_alpha(model, alpha, source)
    with torch.no_grad():
        for key, tensor in sd.items():
            target = params.get(key, buffers.get(key))
            target.copy_(tensor.to(target.dtype))
    if remerge:
        merge_adapter(model)
    return model


def _take_alpha(model, alpha, source):
    """The checkpoint's alpha (the scale of its update) must be the model's: a model whose alpha was a default
    takes the checkpoint's; an explicitly different alpha is an error, never a silent rescale."""
    cfg = _config_of(model)
    if not method_class(cfg["method"]).has_alpha:  # no scale
        return
    if alpha is None:
        logger.warning("%s records no alpha: using the model's alpha=%g (scale alpha/r = %g)", source, cfg["alpha"],
                       cfg["alpha"] / cfg["rank"])
        return
    if math.isclose(alpha, cfg["alpha"], rel_tol=1e-6):
        return
    if cfg.get("alpha_given", True):
        raise AdapterError(f"{source} was trained with alpha={alpha:g}, but the model's adapter has alpha="
                           f"{cfg['alpha']:g}; apply the adapter with alpha={alpha:g} (e.g. --lora_alpha {alpha:g}), "
                           "or leave alpha unset so the checkpoint's is used")
    logger.info("%s: using the checkpoint's alpha=%g (the model's default was %g)", source, alpha, cfg["alpha"])
    cfg["alpha"] = float(alpha)
    for _, layer in adapter_layers(model):
        layer.alpha, layer.scale = float(alpha), float(alpha) / layer.r


def load_adapter(model: nn.Module, path: PathLike) -> nn.Module:
    """Load an adapter saved by save_adapter (dir or .safetensors), a PEFT dir, or a loralib .pt/.bin state dict.

    A model without an adapter gets one applied from the saved config first (ours or PEFT's). Every checkpoint
    tensor must land in the model and every adapter tensor of the model must be in the checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter path {path} does not exist")
    if path.is_dir() and not (path / ADAPTER_FILE).exists() and (path / PEFT_CONFIG).exists():
        return load_peft(model, path)
    if path.is_dir():
        weights, meta_file = path / ADAPTER_FILE, path / CONFIG_FILE
        if not weights.exists():
            raise AdapterError(f"{path} holds no adapter: neither {ADAPTER_FILE} (save_adapter) nor {PEFT_CONFIG} + "
                               f"{PEFT_WEIGHTS} (PEFT)")
    elif path.suffix == ".safetensors":
        weights, meta_file = path, path.with_name(CONFIG_FILE)
    elif path.suffix in (".pt", ".bin", ".pth"):
        return _load_loralib(model, path)
    else:
        raise AdapterError(f"adapter path {path} is neither a folder nor a .safetensors/.pt/.bin file")
    meta = _read_json(meta_file) if meta_file.exists() else None
    if not adapter_layers(model):
        if meta is None:
            raise AdapterError(f"{meta_file} not found: cannot tell which adapter to build")
        apply_adapter(model, _meta_value(meta, "method", meta_file), _meta_value(meta, "rank", meta_file),
                      _meta_value(meta, "alpha", meta_file), _meta_value(meta, "target_modules", meta_file),
                      meta.get("dropout", 0.0), meta.get("seed", 0), meta.get("modules_to_save") or None,
                      meta.get("fused_qkv_lora", True))
    elif meta is not None:
        cfg = _config_of(model)
        if _meta_value(meta, "method", meta_file) != cfg["method"]:
            raise AdapterError(f"checkpoint holds a {meta['method']} adapter, model has {cfg['method']}")
    alpha = None
    if meta is not None:
        has_alpha = method_class(_config_of(model)["method"]).has_alpha  # the same method as meta's (checked)
        alpha = _check_alpha(_meta_value(meta, "alpha", meta_file)) if has_alpha else 1.0
    return _load_tensors(model, _strip_prefixes(_read_safetensors(weights), model), str(path), alpha)


def _load_loralib(model, path):
    """microsoft/LoRA checkpoints: a state dict from loralib.lora_state_dict (keys `...query.lora_A`)."""
    if not adapter_layers(model):
        raise AdapterError(f"{path} is a loralib checkpoint, which holds no rank or alpha: apply a LoRA adapter "
                           "with the checkpoint's rank and alpha first "
                           "(run_glue.py: --apply_lora --lora_r R --lora_alpha A)")
    sd = _read_pt(path)
    return _load_tensors(model, _strip_prefixes(sd, model), str(path))


# ---- Hugging Face PEFT format

def peft_config(method: str, rank: int, alpha: float | None, target_modules: Sequence[str], dropout: float = 0.0,
                seed: int = 0, modules_to_save: Sequence[str] | None = None, **extra: Any) -> Any:
    """The HF PEFT config equivalent to apply_adapter's arguments (same defaults), for side-by-side runs.

    target_modules is required (PEFT would pick its own defaults); extra keys go to the config (task_type...).
    """
    import peft
    if method not in METHODS:
        raise AdapterError(f"unknown adapter method {method!r}; choose one of {', '.join(METHODS)}")
    shared = dict(r=rank, target_modules=list(target_modules), modules_to_save=modules_to_save, **extra)
    alpha = default_alpha(method, rank) if alpha is None else alpha
    return method_class(method).peft_config(peft, alpha, dropout, seed, shared)


def save_peft(model: nn.Module, path: PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained` reads."""
    cfg = _config_of(model)
    layer_class, prefix = method_class(cfg["method"]), "base_model.model."
    fan_in_fan_out = any(layer.fan_in_fan_out for _, layer in adapter_layers(model))
    sd, rank_pattern, alpha_pattern = {}, {}, {}
    for name, layer in adapter_layers(model):
        layer.peft_tensors(name, prefix, sd, rank_pattern, alpha_pattern, cfg["alpha"])
    for key, t in _saved_module_tensors(model, cfg).items():
        sd[prefix + key] = t
    bases = getattr(model, BASES_ATTR, None)
    if bases is not None:
        for bn, b in bases.named_buffers():
            sd[f"base_model.{bn}"] = b
            if layer_class.peft_repeats_bases:  # PEFT's RandLoRA files also repeat the bases under every layer
                for name, _ in adapter_layers(model):
                    sd[f"{prefix}{name}.{bn}"] = b
    config = {"peft_type": layer_class.peft_type, "target_modules": cfg["target_modules"], "r": cfg["rank"],
              "modules_to_save": cfg["modules_to_save"] or None, "fan_in_fan_out": fan_in_fan_out,
              "bias": "none", "task_type": None, "inference_mode": True, "init_weights": True,
              "base_model_name_or_path": base_model_name_or_path, "layers_to_transform": None,
              "layers_pattern": None, "revision": None}
    layer_class.peft_export_config(config, cfg, rank_pattern, alpha_pattern)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    saveable = _to_saveable(sd)
    _atomic(path / PEFT_WEIGHTS, lambda tmp: save_file(saveable, tmp, metadata={"format": "pt"}))
    _atomic(path / PEFT_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return path


def _check_rank_pattern_covers_every_layer(path, model, rank_pattern, targets, rank):
    """A rank_pattern for some layers only means two ranks in one adapter (e.g. our save_peft of GPT-2's fused
    c_attn, 2r unfused, beside MLP layers at r), which one adapter of ours cannot hold: one clear error."""
    others = [n for n, _ in _target_layers(model, targets, required=False) if not _matches(n, rank_pattern)]
    if others:
        raise AdapterError(
            f"{path}: the adapter has two ranks (rank_pattern gives {next(iter(rank_pattern.values()))} to "
            f"{', '.join(sorted(rank_pattern)[:2])}{', ...' if len(rank_pattern) > 2 else ''}; r {rank} elsewhere, "
            f"e.g. {others[0]}), which this loader cannot build; load the adapter.safetensors saved beside it "
            "(peft_layers.save_adapter keeps GPT-2's fused c_attn as one layer), or adapt layers of one rank")


def load_peft(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a Hugging Face PEFT adapter folder (LoRA, VeRA or RandLoRA) into `model`, applying it if needed."""
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter path {path} does not exist")
    cfg_file, weights = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not cfg_file.exists() or not weights.exists():
        raise AdapterError(f"{path} is not a PEFT adapter folder (needs {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    pc = _read_json(cfg_file)
    layer_class = next((c for c in METHOD_CLASSES.values() if c.peft_type == pc.get("peft_type")), None)
    if layer_class is None:
        raise AdapterError(f"unsupported PEFT adapter type {pc.get('peft_type')!r}; supported: "
                           f"{', '.join(_PEFT_TYPE.values())}")
    method = layer_class.method
    rank_pattern = pc.get("rank_pattern") if layer_class.peft_rank_pattern else None  # PEFT's per-layer ranks (LoRA's)
    if pc.get("use_dora") or rank_pattern and len(set(rank_pattern.values())) > 1:
        raise AdapterError(f"{path}: DoRA and mixed per-layer ranks are not supported")
    targets = _meta_value(pc, "target_modules", cfg_file)
    if isinstance(targets, str):
        raise AdapterError(f"{path}: regex target_modules ({targets!r}) are not supported; list module names")
    rank = _check_rank(_meta_value(pc, "r", cfg_file))
    alpha = layer_class.peft_alpha(pc)
    alpha = _check_alpha(alpha)
    if rank_pattern:
        _check_rank_pattern_covers_every_layer(path, model, rank_pattern, targets, rank)
        # only the uniform case: every layer got the same override
        new_rank = _check_rank(next(iter(rank_pattern.values())))
        alpha = _check_alpha(pc.get("alpha_pattern", {}).get(next(iter(rank_pattern)), alpha * new_rank / rank))
        rank = new_rank
    sd = _strip_prefixes(_read_safetensors(weights), model)
    if not adapter_layers(model):
        dropout = pc.get("lora_dropout", pc.get("vera_dropout", pc.get("randlora_dropout", 0.0))) or 0.0
        apply_adapter(model, method, rank, alpha, targets, dropout, pc.get("projection_prng_key", 0),
                      pc.get("modules_to_save"), fused_qkv_lora=False)
    elif _config_of(model)["method"] != method:
        raise AdapterError(f"{path} holds a {method} adapter, model has {_config_of(model)['method']}")
    # PEFT names: `<layer>.lora_A.weight`; its RandLoRA files also repeat the shared bases under every layer.
    ours = {}
    for k, v in sd.items():
        if k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"):
            k = k[: -len(".weight")]
        elif k.rsplit(".", 1)[-1] in ("randlora_A", "randlora_B", "vera_A", "vera_B") and "." in k:
            continue
        if k in ("vera_A", "vera_B", "randlora_A", "randlora_B"):
            k = f"{BASES_ATTR}.{k}"
        ours[k] = v
    return _load_tensors(model, ours, str(path), alpha)


# peft_layers imports this module at its end; importing peft_layers here, after every definition, lets either
# module be imported first without a cycle.
from peft_layers import (  # noqa: E402
    _PEFT_TYPE,
    ADAPTER_FILE,
    BASES_ATTR,
    CONFIG_FILE,
    METHOD_CLASSES,
    METHODS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    AdapterError,
    _check_alpha,
    _check_rank,
    _config_of,
    _matches,
    _saved_module_tensors,
    _target_layers,
    adapter_layers,
    adapter_state_dict,
    apply_adapter,
    default_alpha,
    merge_adapter,
    method_class,
    unmerge_adapter,
)
