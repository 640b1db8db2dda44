"""Small helpers shared by the scripts: data locations, atomic result files, one-line user errors."""
import json
import os
import sys
import tempfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent
# Real data lives beside the repo (never committed); PEFT_DATA_DIR overrides.
DATA_DIR = Path(os.environ.get("PEFT_DATA_DIR", REPO_DIR.parent / "shared" / "data"))


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2, no traceback."""


def atomic_write_text(path, text):
    """Write text so that readers see the old file or the whole new one, never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; results get the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj, indent=2):
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def run_main(main):
    """Run a script's main(); a UsageError, or peft_layers' AdapterError (an adapter that does not fit is a user
    error too), becomes `error: <message>` on stderr and exit code 2."""
    try:
        return main()
    except Exception as e:
        # Only a script that loaded peft_layers can raise AdapterError; importing it here would add torch's start-up
        # time to scripts that never use it (e2e_eval.py, parse_results.py).
        peft_layers = sys.modules.get("peft_layers")
        if not isinstance(e, UsageError) and not (peft_layers and isinstance(e, peft_layers.AdapterError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
