"""E2E NLG data: read the official CSVs or microsoft/LoRA's `mr || reference` text files as (context, completion)
rows, and write them as JSONL. Shared by gpt2_ft.py, gpt2_beam.py and gpt2_decode.py (with the model input
format and the tokenizer/model loading they have in common).

    python e2e_data.py --input ../shared/data/e2e/original/trainset.csv --output outputs/e2e/data/train.jsonl
    python e2e_data.py --input ../shared/data/e2e/lora_format/test.txt --output outputs/e2e/data/test.jsonl

Accepted inputs (by extension): `.csv` with columns `mr` and `ref` (testset.csv, which has only `MR`, gives empty
completions), `.txt` in LoRA's `mr||ref` line format, and `.jsonl` with `context` and `completion` fields.
Tokenisation is left to the scripts (the model's own tokenizer).
"""
import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from common import UsageError, atomic_write_text, run_main

# microsoft/LoRA's E2E files spell three MR keys differently from the official CSVs.
LORA_KEY_NAMES = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}
_MR_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[(.*?)\]\s*(?:,|$)")
_SPACES = re.compile(r"\s+")


def _clean(text):
    return _SPACES.sub(" ", text).strip()


def mr_to_lora_format(mr):
    """`name[Cocum], eatType[pub]` -> `name : Cocum | Type : pub` (LoRA's layout and key names)."""
    slots = _MR_SLOT.findall(mr)
    if not slots:
        raise UsageError(f"cannot parse meaning representation {mr!r}; expected `key[value], key[value], ...`")
    return " | ".join(f"{LORA_KEY_NAMES.get(k, k)} : {v}" for k, v in slots)


def read_e2e_csv(path, mr_format="lora"):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = {c.lower().lstrip("\ufeff"): c for c in (reader.fieldnames or [])}
        if "mr" not in columns:
            raise UsageError(f"{path}: no `mr` column (found {reader.fieldnames}); expected the official E2E CSV")
        rows = []
        for row in reader:
            mr = _clean(row[columns["mr"]])
            context = mr_to_lora_format(mr) if mr_format == "lora" else mr
            rows.append({"context": context, "completion": _clean(row[columns["ref"]]) if "ref" in columns else ""})
    return rows


def read_lora_txt(path):
    rows = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if "||" not in line:
            raise UsageError(f"{path}:{line_no}: no `||` between meaning representation and reference; "
                             "expected microsoft/LoRA's `mr||reference` lines")
        mr, ref = line.split("||", 1)
        rows.append({"context": _clean(mr), "completion": _clean(ref)})
    return rows


def read_json_lines(path, required, what):
    """Yield the JSON objects of a JSON-lines file; a bad line stops with `path:line: ...` naming `what` it expects."""
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{line_no}: not valid JSON ({e.msg}); expected {what}") from None
        if not isinstance(row, dict) or any(k not in row for k in required):
            raise UsageError(f"{path}:{line_no}: needs {' and '.join(f'`{k}`' for k in required)} fields; "
                             f"expected {what}")
        yield row


def read_jsonl(path):
    return [{"context": row["context"], "completion": row.get("completion", "")}
            for row in read_json_lines(path, ["context"], "objects with `context` and `completion` fields")]


def load_e2e(path, mr_format="lora"):
    """Rows {context, completion} from a .csv, LoRA .txt or .jsonl file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = read_e2e_csv(path, mr_format)
    elif suffix == ".txt":
        rows = read_lora_txt(path)
    elif suffix in (".jsonl", ".json"):
        rows = read_jsonl(path)
    else:
        raise UsageError(f"{path}: unknown data format {suffix!r}; use .csv (official E2E), .txt (LoRA `mr||ref`) "
                         "or .jsonl (context/completion)")
    if not rows:
        raise UsageError(f"{path} holds no examples")
    return rows


def group_references(rows):
    """Distinct contexts in order of first appearance, and the references of each (the multi-reference test set)."""
    refs = {}
    for row in rows:
        refs.setdefault(row["context"], []).append(row["completion"])
    return list(refs), refs


def prompt_ids(tokenizer, context):
    """The model's input for one meaning representation: its tokens, then end-of-text as separator
    (microsoft/LoRA's gpt2_encode.py --add_bos)."""
    return tokenizer.encode(context, add_special_tokens=False) + [tokenizer.eos_token_id]


def completion_ids(tokenizer, completion):
    """The target: the reference after a space, closed by end-of-text (gpt2_encode.py --add_eos)."""
    return tokenizer.encode(" " + completion, add_special_tokens=False) + [tokenizer.eos_token_id]


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a tokenizer from {name_or_path!r} ({str(e).splitlines()[0]}); "
                         "pass --tokenizer_name, e.g. ../shared/data/gpt2_vocab") from None
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer of {name_or_path!r} has no end-of-text token, which ends context and "
                         "completion")
    return tokenizer


def load_causal_lm(name_or_path, **kwargs):
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a causal LM from {name_or_path!r} ({str(e).splitlines()[0]})") from None


def write_jsonl(rows, path):
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@dataclass
class ConvertArguments:
    input: str = field(metadata={"help": "official E2E .csv, LoRA-format .txt, or .jsonl"})
    output: str = field(metadata={"help": "JSONL to write: one {\"context\", \"completion\"} object a line"})
    mr_format: str = field(default="lora", metadata={
        "help": "CSV meaning representations: 'lora' writes `name : X | Type : Y` as microsoft/LoRA's files do; "
                "'original' keeps `name[X], eatType[Y]`", "choices": ["lora", "original"]})


def main():
    from transformers import HfArgumentParser
    (args,) = HfArgumentParser(ConvertArguments).parse_args_into_dataclasses()
    rows = load_e2e(args.input, args.mr_format)
    write_jsonl(rows, args.output)
    contexts, _ = group_references(rows)
    print(f"wrote {len(rows)} examples ({len(contexts)} distinct meaning representations) to {args.output}")


if __name__ == "__main__":
    run_main(main)
