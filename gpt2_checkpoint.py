"""GPT-2 checkpoints as microsoft/LoRA's NLG scripts use them, for gpt2_ft.py and gpt2_beam.py.

Read: `--init_checkpoint` is a torch file -- the original GPT-2 `pytorch_model.bin` (Hugging Face key layout:
`h.0.attn.c_attn.weight`, `wte.weight`, ...), or a microsoft/LoRA `model.<step>.pt` (`{"model_state_dict": ...}`
with keys `module.transformer.h.0.attn.c_attn.lora_A`, either adapter-only (written every --save_interval) or the
whole model (written at the end of each epoch)). It is loaded with `torch.load(weights_only=True)`; its keys are
mapped onto Hugging Face's GPT2LMHeadModel names and split into base weights and LoRA tensors.

Which GPT-2: `--model_card gpt2.sm|gpt2.md|gpt2.lg` names GPT-2 small/medium/large (n_embd 768/1024/1280, 12/24/36
layers, 12/16/20 heads). A `config.json` beside the checkpoint (every gpt2_ft.py work dir and every Hugging Face
model folder has one) describes the model exactly and is used instead; the card is then checked against it: a
standard GPT-2 size other than the card's is an error, a non-standard model (e.g. a tiny test model) is used as
its config says, with a log line. Without a config.json the card's architecture is built and the checkpoint's
tensor shapes must match it (a clear error names the card that would fit).

Write: `model.<step>.pt` in the same layout (keys `module.transformer....`, so microsoft/LoRA's `load_weight` and
`loralib` read them): LoRA tensors only, or the whole model (`lm_head.decoder.weight` tied to `wte`).
"""
import logging
import re
import tempfile
from pathlib import Path

import torch

from common import UsageError, atomic_output, one_line

logger = logging.getLogger("gpt2_checkpoint")

MODEL_CARDS = {  # microsoft/LoRA's --model_card values, and the Hub name of the same GPT-2
    "gpt2.sm": {"n_embd": 768, "n_layer": 12, "n_head": 12, "hub": "gpt2"},
    "gpt2.md": {"n_embd": 1024, "n_layer": 24, "n_head": 16, "hub": "gpt2-medium"},
    "gpt2.lg": {"n_embd": 1280, "n_layer": 36, "n_head": 20, "hub": "gpt2-large"},
}
_LAYER = re.compile(r"transformer\.h\.(\d+)\.")
# microsoft/LoRA's load_weight also accepts the TF-converted names `.g`, `.b`, `.w`.
_OLD_SUFFIX = {"g": "weight", "b": "bias", "w": "weight"}


def card_hub_name(card):
    return MODEL_CARDS[card]["hub"]


def read_state_dict(path, what="--init_checkpoint"):
    """The tensors of a torch checkpoint (unwrapping `model_state_dict`); anything else is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (truncated zip), EOFError, ...
        said = str(e)
        if "global" in said.lower() and "allowlist" in said:
            reason = "it holds pickled Python objects besides tensors, which are refused for safety"
        else:  # torch's own message would advise weights_only=False: it is not repeated here
            reason = "unreadable, truncated or not a torch file"
        raise UsageError(f"{what} {path} is not a usable torch checkpoint ({reason}); pass the original GPT-2 "
                         "pytorch_model.bin or a model.<step>.pt") from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UsageError(f"{what} {path} does not hold a state dict of tensors")
    return obj


def split_state_dict(sd):
    """(base weights, LoRA tensors), both keyed by Hugging Face GPT2LMHeadModel names."""
    base, lora = {}, {}
    for key, tensor in sd.items():
        name = key[len("module."):] if key.startswith("module.") else key
        head, _, last = name.rpartition(".")
        if last in _OLD_SUFFIX:
            name = f"{head}.{_OLD_SUFFIX[last]}"
        if name.startswith("lm_head."):
            continue  # tied to the token embedding
        if not name.startswith("transformer."):
            name = "transformer." + name  # the original pytorch_model.bin holds GPT2Model's keys
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers, rebuilt by the model
        (lora if ".lora_" in name else base)[name] = tensor
    return base, lora


def _shape_of(base):
    """(n_embd, n_layer, vocab, n_positions) read from the tensors."""
    wte, wpe = base.get("transformer.wte.weight"), base.get("transformer.wpe.weight")
    if wte is None or wpe is None:
        raise UsageError("the checkpoint holds base weights but no token/position embedding "
                         "(transformer.wte.weight, transformer.wpe.weight): not a GPT-2 checkpoint")
    layers = {int(m.group(1)) for k in base if (m := _LAYER.match(k))}
    return wte.shape[1], (max(layers) + 1 if layers else 0), wte.shape[0], wpe.shape[0]


def _card_for(n_embd, n_layer):
    return next((c for c, v in MODEL_CARDS.items() if (v["n_embd"], v["n_layer"]) == (n_embd, n_layer)), None)


def gpt2_config(path, base, card):
    """The GPT2Config of the checkpoint at `path` (see the module docstring for how card and config.json meet)."""
    from transformers import GPT2Config
    n_embd, n_layer, vocab, n_pos = _shape_of(base)
    fits = _card_for(n_embd, n_layer)
    beside = Path(path).parent / "config.json"
    if beside.is_file():
        try:
            config = GPT2Config.from_pretrained(beside.parent)
        except (OSError, ValueError) as e:
            raise UsageError(f"{beside} is not a GPT-2 config ({one_line(e)[:120]}); fix or remove it") from None
        if (config.n_embd, config.n_layer, config.vocab_size) != (n_embd, n_layer, vocab):
            raise UsageError(f"{beside} describes n_embd {config.n_embd}, {config.n_layer} layers, vocab "
                             f"{config.vocab_size}, but {path} holds n_embd {n_embd}, {n_layer} layers, vocab "
                             f"{vocab}: remove the stale config.json or use the matching checkpoint")
        if card and fits and fits != card:
            raise UsageError(f"--model_card {card} does not match {path}, which is GPT-2 {fits} "
                             f"(n_embd {n_embd}, {n_layer} layers): pass --model_card {fits}")
        if card and not fits:
            logger.info("architecture from %s (n_embd %d, %d layers): not a standard GPT-2 size, so --model_card "
                        "%s is not applied", beside, n_embd, n_layer, card)
        return config
    card = card or fits
    if card is None:
        raise UsageError(f"{path} holds a GPT-2 with n_embd {n_embd} and {n_layer} layers, which is no standard "
                         "size: put its config.json beside it")
    spec = MODEL_CARDS[card]
    if (spec["n_embd"], spec["n_layer"]) != (n_embd, n_layer):
        hint = f"pass --model_card {fits}" if fits else "put the model's config.json beside the checkpoint"
        raise UsageError(f"--model_card {card} is GPT-2 with n_embd {spec['n_embd']} and {spec['n_layer']} layers, "
                         f"but {path} holds n_embd {n_embd} and {n_layer} layers: {hint}")
    return GPT2Config(vocab_size=vocab, n_positions=n_pos, n_embd=n_embd, n_layer=n_layer, n_head=spec["n_head"])


def build_gpt2(config, base, path, dtype=torch.float32):
    """A GPT2LMHeadModel with every base weight from the checkpoint (none missing, none left over)."""
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel(config)
    expected = {k for k in model.state_dict() if k != "lm_head.weight"}
    missing, extra = sorted(expected - set(base)), sorted(set(base) - expected)
    if missing or extra:
        problem = (f"{len(missing)} weights of the model are missing, e.g. {missing[0]}" if missing
                   else f"{len(extra)} tensors have no place in GPT-2, e.g. {extra[0]}")
        raise UsageError(f"{path} does not fit a GPT-2: {problem}")
    bad = [k for k in expected if tuple(base[k].shape) != tuple(model.state_dict()[k].shape)]
    if bad:
        raise UsageError(f"{path}: {bad[0]} has shape {tuple(base[bad[0]].shape)}, the model expects "
                         f"{tuple(model.state_dict()[bad[0]].shape)}")
    model.load_state_dict(base, strict=False)
    model.tie_weights()
    return model.to(dtype)


def lora_rank(lora):
    """The rank of loralib tensors (lora_B is (out, r))."""
    ranks = {t.shape[1] for k, t in lora.items() if k.endswith("lora_B")}
    if len(ranks) != 1:
        raise UsageError(f"the checkpoint's LoRA tensors have ranks {sorted(ranks)}; expected one rank")
    return ranks.pop()


def load_lora_tensors(model, lora, source):
    """Put loralib tensors (Hugging Face names) into an adapted model through peft_layers' loader, which checks
    that every tensor lands and every adapter tensor is given."""
    import peft_layers
    with tempfile.TemporaryDirectory(prefix="loralib-") as tmp:
        file = Path(tmp) / "adapter.pt"
        torch.save(lora, file)
        try:
            peft_layers.load_adapter(model, file)
        except peft_layers.AdapterError as e:
            raise UsageError(str(e).replace(str(file), str(source))) from None


def loralib_state(model, whole):
    """A model.<step>.pt state dict in microsoft/LoRA's layout: its DDP-wrapped GPT2LMModel names."""
    import peft_layers
    if whole:
        sd = model.state_dict()
        out = {f"module.{k}": v for k, v in sd.items() if k != "lm_head.weight"}
        out["module.lm_head.decoder.weight"] = sd["transformer.wte.weight"]
    else:
        out = {f"module.{k}": v for k, v in peft_layers.adapter_state_dict(model).items()}
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def save_loralib_checkpoint(model, path, whole):
    with atomic_output(path) as tmp:
        torch.save({"model_state_dict": loralib_state(model, whole)}, tmp)


def write_config(model, folder):
    """config.json beside model.<step>.pt, so gpt2_beam.py rebuilds exactly this model."""
    with atomic_output(Path(folder) / "config.json") as tmp:
        Path(tmp).write_text(model.config.to_json_string())
