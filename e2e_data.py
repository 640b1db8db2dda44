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
import io
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common import DataError, UsageError, atomic_write_text, check_not_input, read_json_lines, read_text, run_main

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
    """Rows of an official E2E CSV. Strict quoting: a quoted field cut off by the end of the file is an error, not a
    short reference."""
    reader = csv.reader(io.StringIO(read_text(path, "E2E CSV"), newline=""), strict=True)
    try:
        header = next(reader, None)
        columns = {c.lower().lstrip("\ufeff").strip(): i for i, c in enumerate(header or [])}
        if "mr" not in columns:
            raise DataError(path, f"no `mr` column (found {header}); expected the official E2E CSV", 1)
        rows = []
        for record in reader:
            if not record:
                continue
            if len(record) != len(header):
                raise DataError(path, f"{len(record)} fields where the header has {len(header)}; "
                                "check the quoting of this record", reader.line_num)
            mr = _clean(record[columns["mr"]])
            try:
                context = mr_to_lora_format(mr) if mr_format == "lora" else mr
            except UsageError as e:
                raise DataError(path, str(e), reader.line_num) from None
            completion = _clean(record[columns["ref"]]) if "ref" in columns else ""
            rows.append({"context": context, "completion": completion})
    except csv.Error as e:
        raise DataError(path, f"malformed CSV ({e}; a quoted field is not closed?); fix or re-download the file",
                        reader.line_num) from None
    return rows


def read_lora_txt(path):
    rows = []
    for line_no, line in enumerate(read_text(path, "LoRA-format text file").splitlines(), start=1):
        if not line.strip():
            continue
        if "||" not in line:
            raise DataError(path, "no `||` between meaning representation and reference; expected "
                            "microsoft/LoRA's `mr||reference` lines", line_no)
        mr, ref = line.split("||", 1)
        rows.append({"context": _clean(mr), "completion": _clean(ref)})
    return rows


def _token_ids(value):
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def read_jsonl(path):
    """Text rows ({"context": str, "completion": str}) or microsoft/LoRA token-id rows (gpt2_encode.py output:
    {"context": [ids], "completion": [ids]}); one kind per file."""
    rows, kind = [], None
    for line_no, obj in read_json_lines(path, "JSON-lines data file"):
        if "context" not in obj:
            raise DataError(path, "needs a `context` field; expected {\"context\", \"completion\"} objects", line_no)
        context, completion = obj["context"], obj.get("completion", [] if isinstance(obj["context"], list) else "")
        if isinstance(context, str) and isinstance(completion, str):
            row_kind = "text"
        elif _token_ids(context) and _token_ids(completion):
            row_kind = "tokens"
        else:
            raise DataError(path, "`context` and `completion` must both be text or both lists of token ids "
                            "(gpt2_encode.py output)", line_no)
        if kind not in (None, row_kind):
            raise DataError(path, f"{row_kind} row in a file of {kind} rows; use one kind per file", line_no)
        kind = row_kind
        rows.append({"context": context, "completion": completion, **({"cate": obj["cate"]} if "cate" in obj else {})})
    return rows


def is_token_data(rows):
    """True for microsoft/LoRA token-id rows (already tokenised, with its separators)."""
    return bool(rows) and isinstance(rows[0]["context"], list)


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


def check_limit(value, flag):
    """A --max_*examples value: None (all) or a positive count."""
    if value is not None and value < 1:
        raise UsageError(f"{flag} {value}: give a positive number of examples, or leave it out for all")
    return value


def group_references(rows):
    """Distinct contexts in order of first appearance, and the references of each (the multi-reference test set)."""
    refs = {}
    for row in rows:
        key = tuple(row["context"]) if isinstance(row["context"], list) else row["context"]
        refs.setdefault(key, []).append(row["completion"])
    return list(refs), refs


def prompt_ids(tokenizer, context):
    """The model's input for one meaning representation: its tokens, then end-of-text as separator
    (microsoft/LoRA's gpt2_encode.py --add_bos)."""
    return tokenizer.encode(context, add_special_tokens=False) + [tokenizer.eos_token_id]


def completion_ids(tokenizer, completion):
    """The target: the reference after a space, closed by end-of-text (gpt2_encode.py --add_eos)."""
    return tokenizer.encode(" " + completion, add_special_tokens=False) + [tokenizer.eos_token_id]


def load_tokenizer(name_or_path):
    """A tokenizer from a Hub name or folder; a folder with only OpenAI's `encoder.json` + `vocab.bpe` (what
    microsoft/LoRA's --vocab names) is read as the same GPT-2 BPE."""
    from transformers import AutoTokenizer
    folder = Path(str(name_or_path))
    openai_only = (folder / "encoder.json").is_file() and (folder / "vocab.bpe").is_file() and not any(
        (folder / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))
    try:
        if openai_only:  # the same two files under Hugging Face's names
            with tempfile.TemporaryDirectory(prefix="gpt2-vocab-") as tmp:
                shutil.copy(folder / "encoder.json", Path(tmp) / "vocab.json")
                shutil.copy(folder / "vocab.bpe", Path(tmp) / "merges.txt")
                tokenizer = AutoTokenizer.from_pretrained(tmp, tokenizer_type="gpt2")
        else:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a tokenizer from {name_or_path!r} ({str(e).splitlines()[0]}); "
                         "pass --tokenizer_name, e.g. ../shared/data/gpt2_vocab") from None
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer of {name_or_path!r} has no end-of-text token, which ends context and "
                         "completion")
    return tokenizer


def load_causal_lm(name_or_path, edit_config=None, **kwargs):
    """A causal LM by Hub name or folder; edit_config(config), when given, may change its config before the model
    is built."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        if edit_config is not None:
            kwargs["config"] = AutoConfig.from_pretrained(name_or_path)
            edit_config(kwargs["config"])
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


def main(argv=None):
    from transformers import HfArgumentParser
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    (args,) = HfArgumentParser(ConvertArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    check_not_input(args.output, args.input)
    rows = load_e2e(args.input, args.mr_format)
    write_jsonl(rows, args.output)
    contexts, _ = group_references(rows)
    print(f"wrote {len(rows)} examples ({len(contexts)} distinct meaning representations) to {args.output}")


if __name__ == "__main__":
    run_main(main)
