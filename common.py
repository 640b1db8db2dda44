"""Small helpers shared by the scripts: data locations, safe reading and atomic writing of files, the one exit
convention, and the few torch idioms every training or generation script repeats.

Exit convention (every script): `run_main(main)` runs the entry point. A problem the user can fix (bad flag,
bad or missing file, an adapter that does not fit, an unwritable output folder, a full disk) is a `UsageError`
(or a subclass: `DataError` for a data file, naming file and line) or an OSError, printed as one line
`error: <what is wrong>; <how to fix it>` with exit code 2. Anything unexpected prints one line
`error: internal error ...` and exits 1; `PEFT_DEBUG=1` shows the full traceback instead.
"""
import contextlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
# Real data lives beside the repo (never committed); PEFT_DATA_DIR overrides.
DATA_DIR = Path(os.environ.get("PEFT_DATA_DIR", REPO_DIR.parent / "shared" / "data"))
DEBUG_ENV = "PEFT_DEBUG"


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""


class DataError(UsageError):
    """A data or result file that cannot be used: the message names the file (and line where there is one)."""

    def __init__(self, path, problem, line=None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_text(path, what="file"):
    """The whole text of a UTF-8 file; a missing file or non-UTF-8 bytes become one DataError naming the line."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder, not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(path, f"byte {data[e.start]:#04x} is not UTF-8 text; re-save the {what} as UTF-8",
                        line) from None


def read_json(path, what="JSON file"):
    """A JSON document; invalid JSON is a DataError with its line, not a traceback."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e.msg}); fix or delete the {what}", e.lineno) from None


def read_json_lines(path, what="JSON-lines file"):
    """One JSON object per non-empty line, as (line number, object) pairs."""
    rows = []
    for line_no, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"not a JSON line ({e.msg}); expected one JSON object per line", line_no) from None
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", line_no)
        rows.append((line_no, obj))
    return rows


def finite_number(value, what):
    """`value` as a float, or a UsageError naming `what` when it is missing, non-numeric, NaN or infinite."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise UsageError(f"{what} is {number}, not a finite number")
    return number


# ----------------------------------------------------------------------------------------------------------
# Writing: whole files or nothing, never over an input


def check_output_dir(path, inputs=()):
    """Create `path` and prove it writable now, not after hours of training. `inputs`: files the run reads that
    must not be the folder itself."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"output folder {path} is not writable ({e.strerror}); choose another folder or fix "
                         "its permissions") from None
    for item in inputs:
        check_not_input(path, item)
    return path


def check_not_input(output, *inputs):
    """Refuse to write `output` when it is one of the run's input files (same file, whatever the spelling)."""
    out = Path(output)
    for item in inputs:
        if item is None:
            continue
        item = Path(item)
        if out.exists() and item.exists() and os.path.samefile(out, item):
            raise UsageError(f"{out} is an input of this run; writing there would destroy it: choose another "
                             "output location")
        if not out.exists() and out.resolve() == item.resolve():
            raise UsageError(f"{out} is an input of this run; choose another output location")


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, on failure it is
    removed. For writers that take a file name (torch.save, safetensors' save_file, savefig)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path, text):
    """Write text so that readers see the old file or the whole new one, never a half-written file."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path, obj, indent=2):
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, allow_nan=False) + "\n")


RUN_SETTINGS = "run_settings.json"  # what a training run trained with, beside its checkpoints


def _as_stored(settings):
    """Settings as they read back from the record (values JSON cannot hold, such as paths, as their text)."""
    return json.loads(json.dumps(settings, default=str))


def write_run_settings(folder, settings):
    atomic_write_json(Path(folder) / RUN_SETTINGS, _as_stored(settings))


def settings_changed(folder, settings):
    """How `settings` differ from those the run in `folder` stored when it started: a short text ("lr: 0.0002
    then, 0.0005 now; ..."), "" when they are the same, None when the folder holds no readable record (a run of
    an older version). A resume must continue the same experiment; a changed command resumed silently would
    report the old run's model under the new settings."""
    try:
        stored = json.loads((Path(folder) / RUN_SETTINGS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    settings = _as_stored(settings)
    # Keys only one side has (a setting this version added or dropped) are not a change of the run.
    changed = [f"{k}: {stored[k]!r} then, {settings[k]!r} now" for k in sorted(set(stored) & set(settings))
               if stored[k] != settings[k]]
    return "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")


def one_line(text):
    """Text on a single line (newlines and tabs become spaces), for line-per-example output files."""
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------------------
# Torch idioms (torch is imported lazily: parse_results and e2e_eval never need it)


def dtype_from_flags(bf16=False, fp16=False, cuda=None):
    """torch dtype for --bf16/--fp16 (float32 when neither); both at once, or fp16 without a GPU, is a UsageError."""
    import torch

    if bf16 and fp16:
        raise UsageError("choose one of --bf16 and --fp16")
    if cuda is None:
        cuda = torch.cuda.is_available()
    if fp16 and not cuda:
        raise UsageError("--fp16 needs a CUDA GPU and none is visible; drop --fp16 (or use --bf16) on CPU")
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def process_group_backend():
    """gloo on CPU (DDP and DeepSpeed need it there), NCCL on GPUs."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def flags_given(argv):
    """The flag names on a command line, as dataclass field names (--local-rank=0 -> local_rank)."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}


def recipe_defaults_note(script, theirs, used, spelled):
    """The start-line note for flags left off the command line whose value here (`used`, the E2E recipe's) differs
    from microsoft/LoRA's `script` argparse default (`theirs`); None when there is none. Flags used as None do not
    apply to the run."""
    def shown(v):
        return ("on" if v else "off") if isinstance(v, bool) else f"{v:g}" if isinstance(v, float | int) else v
    differ = [f"--{k} {shown(used[k])} (theirs {shown(v)})" for k, v in theirs.items()
              if k not in spelled and used[k] is not None and used[k] != v]
    if not differ:
        return None
    return ("note: not given on the command line, so the E2E recipe's values are used where microsoft/LoRA's "
            f"{script} would take its argparse defaults: " + ", ".join(differ))


@contextlib.contextmanager
def count_saved_for_backward(model):
    """Counts the bytes autograd keeps for backward of what runs inside the block: each saved tensor's storage
    once, the model's own parameters and buffers left out (they exist whether or not anything is kept). Yields a
    dict (storage -> bytes); sum its values after the block."""
    import torch
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield kept


def ensure_pad_token(tokenizer, model=None):
    """GPT-2-style tokenizers have no pad token: pad with end-of-text, which the loss and attention mask ignore."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# The entry point


def _user_error(e):
    # Only a script that loaded peft_layers can raise AdapterError; importing it here would add torch's start-up
    # time to scripts that never use it (e2e_eval.py, parse_results.py).
    peft_layers = sys.modules.get("peft_layers")
    return isinstance(e, UsageError) or bool(peft_layers and isinstance(e, peft_layers.AdapterError))


def _one_line_excepthook(exc_type, exc, tb):
    message = one_line(exc)[:300]
    print(f"error: internal error {exc_type.__name__}: {message} (rerun with {DEBUG_ENV}=1 for the traceback)",
          file=sys.stderr)


def run_main(main, argv=None):
    """Run a script's main(argv) with the one exit convention (see the module docstring).

    An unexpected exception still propagates (so callers and tests see it); only when it reaches the top of the
    process does the installed hook print it as one line (Python then exits 1)."""
    if not os.environ.get(DEBUG_ENV):
        sys.excepthook = _one_line_excepthook
    try:
        return main(argv) if argv is not None else main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        if _user_error(e):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, OSError) and e.errno is not None:
            where = f": {e.filename}" if e.filename else ""
            print(f"error: {e.strerror or e}{where}; free space or fix permissions and rerun", file=sys.stderr)
            sys.exit(2)
        raise
