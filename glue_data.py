"""GLUE tasks for run_glue.py and parse_results.py: the task table, the three data sources, the metrics.

Every source is turned into the same columns: `sentence1`, optional `sentence2`, `label` (class id, a float
for STS-B, -1 where a test split has no labels) and `idx` (the row id that test predictions are written with).
Label ids follow the Hub's `nyu-mll/glue` order, so a model trained from the classic GLUE folder and one trained
from the Hub agree on what class 0 means.

Heavy libraries (datasets, scikit-learn, scipy) are imported inside the functions that need them, so that
parse_results.py can read the task table without paying for them.
"""
import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from common import DataError, UsageError, one_line, read_text

csv.field_size_limit(1 << 24)  # some GLUE rows (MNLI parses) are longer than csv's 128 KiB default


@dataclass(frozen=True)
class GlueTask:
    folder: str  # folder name in the classic download_glue_data.py layout
    tsv_text: tuple  # text columns in the classic .tsv files
    tsv_label: str  # label column in the classic .tsv files
    hub_text: tuple  # text columns in nyu-mll/glue
    labels: tuple | None  # class names in nyu-mll/glue order; None for regression (STS-B)
    report: tuple  # metrics parse_results reports; the first one also picks the best epoch
    tsv_no_header: tuple = ()  # column names for .tsv files written without a header (CoLA train/dev)


TASKS = {
    "cola": GlueTask("CoLA", ("sentence",), "label", ("sentence",), ("unacceptable", "acceptable"),
                     ("matthews_correlation",), tsv_no_header=("source", "label", "judgement", "sentence")),
    "sst2": GlueTask("SST-2", ("sentence",), "label", ("sentence",), ("negative", "positive"), ("accuracy",)),
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", ("sentence1", "sentence2"),
                     ("not_equivalent", "equivalent"), ("accuracy",)),
    "qqp": GlueTask("QQP", ("question1", "question2"), "is_duplicate", ("question1", "question2"),
                    ("not_duplicate", "duplicate"), ("accuracy", "f1")),
    "stsb": GlueTask("STS-B", ("sentence1", "sentence2"), "score", ("sentence1", "sentence2"), None,
                     ("combined_score",)),
    "mnli": GlueTask("MNLI", ("sentence1", "sentence2"), "gold_label", ("premise", "hypothesis"),
                     ("entailment", "neutral", "contradiction"), ("accuracy", "accuracy_mm")),
    "qnli": GlueTask("QNLI", ("question", "sentence"), "label", ("question", "sentence"),
                     ("entailment", "not_entailment"), ("accuracy",)),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"),
                    ("entailment", "not_entailment"), ("accuracy",)),
    "wnli": GlueTask("WNLI", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"),
                     ("not_entailment", "entailment"), ("accuracy",)),
}

# Split names follow nyu-mll/glue; MNLI has a matched and a mismatched dev and test set.
TSV_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
MNLI_TSV_FILES = {"train": "train.tsv", "validation_matched": "dev_matched.tsv",
                  "validation_mismatched": "dev_mismatched.tsv", "test_matched": "test_matched.tsv",
                  "test_mismatched": "test_mismatched.tsv"}


def get_task(name):
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; choose one of: {' '.join(TASKS)}")
    return TASKS[name]


def split_names(task_name, kind):
    """The split names of one kind ('train', 'validation' or 'test') for a task."""
    if kind == "train":
        return ["train"]
    return [f"{kind}_matched", f"{kind}_mismatched"] if task_name == "mnli" else [kind]


STSB_RANGE = (0.0, 5.0)  # STS-B similarity scores


def parse_label(task, value, path, line=None, row=None):
    """Turn a label as written in a file (a class name, a class id, a score) into the id/float the model uses.

    Returns -1 for an empty label (unlabelled test rows). A label the task cannot have is a DataError naming the
    file and line (`row`: the row number, for files whose rows are not lines)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() in ("", "-1"):
        return -1.0 if task.labels is None else -1
    text = str(value).strip()
    where = "" if row is None else f"row {row}: "
    if task.labels is None:
        try:
            score = float(text)
        except ValueError:
            raise DataError(path, f"{where}label {text!r} is not a number; STS-B labels are similarity scores "
                                  "0-5", line) from None
        if not (math.isfinite(score) and STSB_RANGE[0] <= score <= STSB_RANGE[1]):
            raise DataError(path, f"{where}label {text!r} is outside [0, 5], the range of STS-B similarity scores; "
                                  "fix the file", line)
        return score
    if text in task.labels:
        return task.labels.index(text)
    try:
        as_int = int(float(text))
    except (ValueError, OverflowError):
        as_int = None
    if as_int is None or as_int != float(text) or not 0 <= as_int < len(task.labels):
        raise DataError(path, f"{where}label {text!r} is outside the task's label set {list(task.labels)} (or ids "
                              f"0-{len(task.labels) - 1}); fix the file or --task_name", line)
    return as_int


def check_labelled(task, label, path, line=None, row=None):
    """Training and validation rows need a label: found here, before any training, with the file and line."""
    if label == -1:
        where = "" if row is None else f"row {row}: "
        raise DataError(path, f"{where}empty label; every training and validation row needs one (unlabelled rows "
                              "belong in the test file)", line)
    return label


def read_glue_tsv(task, path, has_header=True, labelled=False):
    """Read one file of the classic GLUE layout into normalized columns; `labelled`: every row needs a label.

    Quotes are literal text in GLUE (MRPC and MNLI rows contain unbalanced `"`), so csv quoting is off.
    MRPC's header starts with a byte-order mark, which is dropped."""
    text = read_text(path, "GLUE data file").removeprefix("\ufeff")
    if not text.strip():
        raise DataError(path, "the file is empty; download it again (classic download_glue_data.py layout)")
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    if has_header:
        header, rows = rows[0], rows[1:]
    else:
        header = list(task.tsv_no_header)
    missing = [c for c in task.tsv_text if c not in header]
    if missing:
        raise DataError(path, f"no column {missing[0]!r} in the header {header}; "
                              f"is this the {task.folder} file of the classic GLUE layout?", 1)
    text_cols = [header.index(c) for c in task.tsv_text]
    label_col = header.index(task.tsv_label) if task.tsv_label in header else None
    if labelled and label_col is None:
        raise DataError(path, f"no label column {task.tsv_label!r} in the header {header}", 1)
    id_col = next((header.index(c) for c in ("index", "id") if c in header), None)
    columns = {"sentence1": [], "label": [], "idx": []}
    if len(text_cols) == 2:
        columns["sentence2"] = []
    for line_no, row in enumerate(rows, start=2 if has_header else 1):
        if not row:
            continue
        if len(row) < len(header):
            raise DataError(path, f"{len(row)} tab-separated fields, expected {len(header)}", line_no)
        columns["sentence1"].append(row[text_cols[0]])
        if len(text_cols) == 2:
            columns["sentence2"].append(row[text_cols[1]])
        label = parse_label(task, row[label_col] if label_col is not None else None, path, line_no)
        columns["label"].append(check_labelled(task, label, path, line_no) if labelled else label)
        if id_col is not None and not row[id_col].strip().lstrip("-").isdigit():
            raise DataError(path, f"row id {row[id_col]!r} is not an integer", line_no)
        columns["idx"].append(int(row[id_col]) if id_col is not None else len(columns["idx"]))
    return columns


def load_glue_folder(task_name, glue_dir, splits, labelled=False):
    """Load splits of one task from a folder in the classic download_glue_data.py layout."""
    task = TASKS[task_name]
    files = MNLI_TSV_FILES if task_name == "mnli" else TSV_FILES
    out = {}
    for split in splits:
        path = Path(glue_dir) / task.folder / files[split]
        if not path.is_file():
            raise UsageError(f"GLUE file not found: {path}; download the {task.folder} task into {glue_dir} "
                             f"(classic download_glue_data.py layout) or pass --{split.split('_')[0]}_file")
        # CoLA's train/dev files have no header line; its test file does.
        has_header = not (task.tsv_no_header and not split.startswith("test"))
        out[split] = read_glue_tsv(task, path, has_header, labelled)
    return out


def read_rows(path, suffix):
    """The rows of a user's csv or json/jsonl file as a pandas DataFrame of strings; bad files are DataErrors."""
    import pandas as pd

    text = read_text(path, "data file")
    if not text.strip():
        raise DataError(path, "the file is empty")
    if suffix == ".csv":
        try:
            return pd.read_csv(io.StringIO(text), keep_default_na=False, dtype=str)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise DataError(path, f"not a valid csv file ({one_line(e)})") from None
    if text.lstrip().startswith("["):  # one JSON array of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, f"not a valid JSON array of rows ({e.msg})", e.lineno) from None
    else:  # JSON lines
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(path, f"not a JSON line ({e.msg}); expected one JSON object per line",
                                    line_no) from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(path, "expected JSON objects (one per row)")
    return pd.DataFrame.from_records(rows)


def load_local_file(task_name, path, labelled=False):
    """Load a user's csv, json/jsonl or classic-layout tsv file for a task."""
    task = TASKS[task_name]
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return read_glue_tsv(task, path, not task.tsv_no_header, labelled)
    if suffix not in (".csv", ".json", ".jsonl"):
        raise UsageError(f"{path}: unsupported file type {suffix!r}; use .csv, .json/.jsonl or a GLUE .tsv")
    frame = read_rows(path, suffix)
    # Accept the Hub's column names, the classic GLUE names, or the generic sentence1/sentence2/sentence.
    for names in (task.hub_text, task.tsv_text, ("sentence1", "sentence2"), ("sentence",)):
        if all(n in frame.columns for n in names):
            text_names = names
            break
    else:
        raise DataError(path, f"needs text columns {list(task.hub_text)} (or sentence1/sentence2); "
                              f"found {list(frame.columns)}")
    label_name = next((c for c in ("label", task.tsv_label) if c in frame.columns), None)
    id_name = next((c for c in ("idx", "index", "id") if c in frame.columns), None)
    columns = {"sentence1": frame[text_names[0]].astype(str).tolist()}
    if len(text_names) == 2:
        columns["sentence2"] = frame[text_names[1]].astype(str).tolist()
    labels = frame[label_name].tolist() if label_name else [None] * len(frame)
    columns["label"] = []
    for i, value in enumerate(labels):
        label = parse_label(task, value, path, row=i + 1)
        columns["label"].append(check_labelled(task, label, path, row=i + 1) if labelled else label)
    ids = frame[id_name].tolist() if id_name else list(range(len(frame)))
    bad = next((i for i, v in enumerate(ids) if not str(v).strip().lstrip("-").isdigit()), None)
    if bad is not None:
        raise DataError(path, f"row {bad + 1}: row id {ids[bad]!r} is not an integer")
    columns["idx"] = [int(v) for v in ids]
    return columns


def load_hub(task_name, splits):
    """Load splits from the Hub's nyu-mll/glue (needs network access or a filled datasets cache)."""
    from datasets import load_dataset

    task = TASKS[task_name]
    out = {}
    for split in splits:
        ds = load_dataset("nyu-mll/glue", task_name, split=split)
        out[split] = {"sentence1": ds[task.hub_text[0]], "label": ds["label"], "idx": ds["idx"]}
        if len(task.hub_text) == 2:
            out[split]["sentence2"] = ds[task.hub_text[1]]
    return out


def load_glue(task_name, kinds, train_file=None, validation_file=None, test_file=None, glue_dir=None):
    """Load the splits of the given kinds ('train', 'validation', 'test') as datasets.Dataset objects.

    Sources, first that applies: the explicit --*_file, a classic GLUE folder (glue_dir, else $GLUE_DIR),
    the Hub. Returns {split name: Dataset}; MNLI gives validation_matched/_mismatched and test_matched/_mismatched
    from a GLUE folder or the Hub, and one `validation`/`test` split from an explicit file."""
    from datasets import Dataset

    get_task(task_name)
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    glue_dir = glue_dir or os.environ.get("GLUE_DIR")
    columns = {}
    for kind in kinds:
        labelled = kind != "test"  # found now, with file and line, not after training
        if files[kind]:
            columns[kind] = load_local_file(task_name, files[kind], labelled)
        elif glue_dir:
            columns.update(load_glue_folder(task_name, glue_dir, split_names(task_name, kind), labelled))
        else:
            columns.update(load_hub(task_name, split_names(task_name, kind)))
    datasets = {}
    for split, cols in columns.items():
        if len(cols["label"]) == 0:
            raise UsageError(f"the {task_name} {split} split is empty; check the data file")
        if split == "train" and any(label == -1 for label in cols["label"]):
            raise UsageError(f"the {task_name} train split has rows without a label; every training row needs one")
        datasets[split] = Dataset.from_dict(cols)
    return datasets


def subsample(dataset, max_rows):
    """Keep max_rows rows: a fixed random subset (the same for every seed), in file order.

    A random subset rather than the first rows, because some GLUE files are sorted (STS-B by genre)."""
    if max_rows is None or max_rows >= len(dataset):
        return dataset
    import numpy as np

    keep = np.sort(np.random.default_rng(0).permutation(len(dataset))[:max_rows])
    return dataset.select(keep.tolist())


def compute_glue_metrics(task_name, predictions, labels):
    """GLUE metrics with the Hugging Face run_glue key names; predictions are class ids or STS-B scores."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if task_name == "stsb":
        pearson, spearman = float(pearsonr(predictions, labels)[0]), float(spearmanr(predictions, labels)[0])
        return {"pearson": pearson, "spearmanr": spearman, "combined_score": (pearson + spearman) / 2}
    if task_name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    accuracy = float(accuracy_score(labels, predictions))
    if task_name in ("mrpc", "qqp"):
        f1 = float(f1_score(labels, predictions))
        return {"accuracy": accuracy, "f1": f1, "combined_score": (accuracy + f1) / 2}
    return {"accuracy": accuracy}
