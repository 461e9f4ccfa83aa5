"""How every command runs: inputs, batches with resume and shards, atomic writes, the console.

* :mod:`~histo_wsl.runtime.atomic` — Atomic file writes: nothing is ever left half-written under its
  final name.
* :mod:`~histo_wsl.runtime.batch` — The batch runner every slide command shares.
* :mod:`~histo_wsl.runtime.console` — The stderr console: logs, warnings and progress go to stderr,
  machine output to stdout.
* :mod:`~histo_wsl.runtime.inputs` — Slide inputs from files, folders, glob patterns and CSV lists.
* :mod:`~histo_wsl.runtime.memory` — Memory handed back to the operating system after large
  temporaries (long runs stay flat).
* :mod:`~histo_wsl.runtime.record` — What every command records about its run: run.json, the time,
  the machine, JSON-ready values.
* :mod:`~histo_wsl.runtime.threads` — How many CPU threads the model's forward gets: the cores other
  processes leave free.

The names below are imported from their module on first use, so importing the package is free.
"""

from histo_wsl.runtime.lazy import lazy_exports

#: public name → the module of this package that defines it
_EXPORTS = {
    "atomic_path": "atomic",
    "ensure_writable_dir": "atomic",
    "shared_mode": "atomic",
    "write_json": "atomic",
    "write_text": "atomic",
    "BatchOptions": "batch",
    "BatchRunner": "batch",
    "ItemResult": "batch",
    "LOCKS": "batch",
    "Progress": "batch",
    "RunSummary": "batch",
    "STAGING": "batch",
    "print_line": "console",
    "stderr_console": "console",
    "warn": "console",
    "collect_inputs": "inputs",
    "IMAGE_SUFFIXES": "inputs",
    "InputItem": "inputs",
    "parse_shard": "inputs",
    "PATH_COLUMNS": "inputs",
    "read_csv_list": "inputs",
    "select_shard": "inputs",
    "SLIDE_SUFFIXES": "inputs",
    "stdin_paths": "inputs",
    "WSI_SUFFIXES": "inputs",
    "release_freed_memory": "memory",
    "environment": "record",
    "json_ready": "record",
    "now": "record",
    "number_or_none": "record",
    "processor_name": "record",
    "RunRecord": "record",
    "versions": "record",
    "RECHECK_SECONDS": "threads",
    "ThreadGovernor": "threads",
    "usable_cores": "threads",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
