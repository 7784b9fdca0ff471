"""``hcml train --plan FILE``: several trainings, in order, in one process group.

Why: each ``hcml train --nproc-per-node N`` pays torchrun, N interpreters importing torch and DALI, the process
group and its teardown (~10-15 s on a 2-core machine) before and after its steps. A sweep or the demo's seven
runs share all of that: the workers run the plan's entries one after another, each entry exactly the training
``hcml train`` would run with the same recipe and overrides (same seeds, same steps, its own run dir).

A plan is JSON: ``{"runs": [{"name": ..., "config": ..., "overrides": [...], "overwrite": false,
"init_from_run": null}, ...]}``. ``init_from_run`` names the run dir of an *earlier* entry: its newest
checkpoint initialises this run (``model.init_from``), resolved when the entry starts. The plan stops at the
first entry a stop signal ends (its checkpoint written, as for one training).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from hcml.errors import ConfigError
from hcml.files import atomic_write_text


@dataclass(frozen=True)
class PlanEntry:
    name: str
    config: str  # a recipe path or name under configs/
    overrides: list[str] = field(default_factory=list)  # key=value, run_dir and data.root included
    overwrite: bool = False
    init_from_run: str | None = None  # an earlier entry's run dir: its newest checkpoint → model.init_from

    def resolved_overrides(self) -> list[str]:
        """The overrides, plus ``model.init_from`` = the newest checkpoint of ``init_from_run`` (which must exist
        by now: an earlier entry wrote it)."""
        if self.init_from_run is None:
            return list(self.overrides)
        from hcml.launch.checkpoint import list_checkpoints

        found = list_checkpoints(Path(self.init_from_run) / "checkpoints")
        if not found:
            raise ConfigError(f"plan entry {self.name!r}: init_from_run {self.init_from_run} holds no checkpoint "
                              f"(it must be the run dir of an earlier entry)")
        return [*self.overrides, f"model.init_from={found[-1]}"]


def write_plan(path: Path, entries: list[PlanEntry]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps({"runs": [asdict(e) for e in entries]}, indent=1))


def load_plan(path: str | Path) -> list[PlanEntry]:
    """The plan's entries; a clear error naming the file, the entry and the key for anything malformed."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"plan not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"plan {path} is not valid JSON: {e}") from None
    runs = doc.get("runs") if isinstance(doc, dict) else None
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"plan {path}: expected {{\"runs\": [...]}} with at least one entry")
    known = {f.name for f in fields(PlanEntry)}
    entries, seen_dirs = [], set()
    for i, r in enumerate(runs):
        where = f"plan {path}, entry {i}"
        if not isinstance(r, dict):
            raise ConfigError(f"{where}: expected an object, got {type(r).__name__}")
        unknown = sorted(set(r) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} (known: {sorted(known)})")
        missing = [k for k in ("name", "config") if not r.get(k)]
        if missing:
            raise ConfigError(f"{where}: missing {missing}")
        if not isinstance(r.get("overrides", []), list) or not all(isinstance(o, str) for o in r.get("overrides", [])):
            raise ConfigError(f"{where} ({r['name']}): 'overrides' must be a list of key=value strings")
        e = PlanEntry(**r)
        if e.init_from_run is not None and str(Path(e.init_from_run).resolve()) not in seen_dirs:
            raise ConfigError(f"{where} ({e.name}): init_from_run {e.init_from_run} is not the run dir of an "
                              f"earlier entry")
        run_dir = str(Path(run_dir_of(e)).resolve())
        if run_dir in seen_dirs:
            raise ConfigError(f"{where} ({e.name}): run dir {run_dir} is an earlier entry's too (one run per dir)")
        entries.append(e)
        seen_dirs.add(run_dir)
    return entries


def run_dir_of(entry: PlanEntry) -> str:
    """The entry's run dir as its config will have it (the last ``run_dir=`` override wins, as in load_config)."""
    from hcml.launch.config import load_config, resolve_recipe

    return str(load_config(resolve_recipe(entry.config), entry.overrides).run_dir)
