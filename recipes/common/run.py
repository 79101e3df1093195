"""What every recipe's command line shares: the method flags (or a JSON spec), the checks
that run before any training (method flags the method cannot take, data, output dir and
its free space), the hardware line and the results/checkpoint writer."""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

import compemb

from .packages import DataUnavailable

__all__ = ["METHOD_FLAGS", "add_method_args", "spec_from_args", "check_output_dir",
           "hardware", "num_processes", "write_results", "model_bytes", "base_result",
           "add_resume_args", "TrainingState", "TRAINING_STATE"]



# command-line flag -> the option name shared by the methods' config dataclasses
METHOD_FLAGS: Dict[str, str] = {
    "--rank": "rank",
    "--num-factors": "num_factors",
    "--num-codes": "num_codes",
    "--num-groups": "num_groups",
    "--variant": "variant",
    "--shared-subspace": "shared_subspace",
    "--temperature": "temperature",
    "--commitment": "commitment",
}


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """``--method`` and the settings of the methods (each defaults to the method's own)."""
    group = parser.add_argument_group("embedding compression")
    group.add_argument("--method", default="dense", choices=compemb.available_methods(),
                       help="how the embedding table is stored")
    group.add_argument("--rank", type=int, help="tt/tr: the TT (or ring) rank")
    group.add_argument("--num-factors", dest="num_factors", type=int,
                       help="tt/tr: number of cores the table is factored into")
    group.add_argument("--num-codes", dest="num_codes", type=int, help="dpq: codes per group (K)")
    group.add_argument("--num-groups", dest="num_groups", type=int,
                       help="dpq: groups the embedding dimension is split into (D)")
    group.add_argument("--variant", choices=["sx", "vq"], help="dpq: softmax (sx) or vector quantisation (vq)")
    group.add_argument("--shared-subspace", dest="shared_subspace", action="store_true", default=None,
                       help="dpq: one codebook for all groups")
    group.add_argument("--temperature", type=float, help="dpq-sx: softmax temperature")
    group.add_argument("--commitment", type=float, help="dpq-vq: weight of the commitment loss")
    group.add_argument("--config", type=Path,
                       help="a JSON embedding spec, e.g. {\"method\": \"tt\", \"rank\": 16}, "
                            "instead of --method and its flags")


def spec_from_args(args: argparse.Namespace) -> compemb.EmbeddingSpec:
    """The embedding spec named on the command line.

    Raises ``ValueError`` for a flag the chosen method does not take (``--rank`` with
    ``--method dpq``), for method flags next to ``--config``, for an unreadable config file
    and for settings the method rejects."""
    given = {flag: opt for flag, opt in METHOD_FLAGS.items() if getattr(args, opt, None) is not None}
    if getattr(args, "config", None) is not None:
        if given:
            raise ValueError(f"--config gives the whole embedding spec; drop {sorted(given)} "
                             f"or put those settings in the JSON file")
        try:
            text = Path(args.config).read_text()
        except OSError as err:
            raise ValueError(f"--config: cannot read {args.config}: {err.strerror or err}") from None
        try:
            return compemb.EmbeddingSpec.from_json(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--config: {args.config} is not valid JSON ({err})") from None
    method = compemb.get_method(args.method)
    fields = method.field_names()
    wrong = sorted(flag for flag, opt in given.items() if opt not in fields)
    if wrong:
        takes = sorted(flag for flag, opt in METHOD_FLAGS.items() if opt in fields)
        raise ValueError(f"{', '.join(wrong)} cannot be used with --method {args.method}; "
                         f"it takes {', '.join(takes) if takes else 'no settings'}")
    return compemb.EmbeddingSpec(args.method, {opt: getattr(args, opt) for opt in given.values()})


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(out: Path, need_bytes: int) -> None:
    """Fail (``ValueError`` saying why) unless ``out`` is, or can be made, a writable folder
    with ``need_bytes`` free. Creates the folder; writes nothing else there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    parent = _existing_parent(out)
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a folder")
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise ValueError(f"--out {out}: only {free / 2**20:.1f} MiB free on its disk, the run "
                         f"writes about {need_bytes / 2**20:.1f} MiB (checkpoint and results); "
                         f"free some space or choose another folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {parent} is not writable; choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {out} is not writable: {err.strerror or err}") from None


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict (what the checkpoint holds)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def num_processes() -> int:
    """The training processes (``accelerate launch --num_processes``; 1 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def hardware() -> str:
    """One line: CPU (and GPU), the number of torch threads and of processes."""
    cpu = platform.processor() or platform.machine()
    line = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if torch.cuda.is_available():
        line += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    if num_processes() > 1:
        line += f", {num_processes()} processes"
    return line


def write_results(out: Path, result: Dict[str, Any], model: Optional[nn.Module] = None, *,
                  export_embedding: bool = False) -> Optional[Path]:
    """``out/results.json`` and ``out/model.pt`` (the state_dict, when a model is given),
    from the main process only (under ``accelerate launch`` with several processes).

    With ``export_embedding`` and an embedding that has an inference form
    (``model.embedding.export()``, e.g. DPQ's packed codes and codebook), also
    ``out/model_compact.pt``: the same model with that form in place of the training
    table. The results record both files' sizes."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(result)
    if model is not None:
        torch.save(model.state_dict(), out / "model.pt")
        result.update(checkpoint="model.pt", checkpoint_bytes=(out / "model.pt").stat().st_size)
        export = getattr(getattr(model, "embedding", None), "export", None)
        if export_embedding and callable(export):
            compact = copy.deepcopy(model)
            compact.embedding = export()
            torch.save(compact.state_dict(), out / "model_compact.pt")
            result.update(compact_checkpoint="model_compact.pt",
                          compact_checkpoint_bytes=(out / "model_compact.pt").stat().st_size)
    path = out / "results.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True))
    return path


def base_result(task: str, dataset: str, scale: str, spec: compemb.EmbeddingSpec,
                model: nn.Module, report: "compemb.CompressionReport", metric: str,
                value: float, higher_is_better: bool, wall_time_s: float, **extra: Any) -> Dict[str, Any]:
    """The results.json fields every recipe writes (``report.py`` reads these)."""
    embedding = getattr(model, "embedding", None)
    if embedding is None:  # a transformers model: its input embedding
        get_input = getattr(model, "get_input_embeddings", None)
        embedding = get_input() if callable(get_input) else nn.Module()
    emb_bytes = sum(p.numel() * p.element_size() for p in embedding.parameters())
    return {
        "task": task, "dataset": dataset, "scale": scale,
        "method": spec.method, "settings": spec.to_dict(),
        "embedding_ratio": report.embedding_ratio,
        # a dense table is no compressed layer: the report has no row for it
        "embedding_stored_bytes": report.embedding_stored_bytes if report.rows else emb_bytes,
        "embedding_dense_bytes": report.embedding_dense_bytes if report.rows else emb_bytes,
        "embedding_parameters": sum(p.numel() for p in embedding.parameters()),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "model_stored_bytes": report.model_stored_bytes,
        "report": report.to_dict(),
        "metric": metric, "value": value, "higher_is_better": higher_is_better,
        "wall_time_s": wall_time_s, "hardware": hardware(), "processes": num_processes(),
        "torch": torch.__version__,
        **extra,
    }


def at_least(minimum: int):
    """An argparse ``type``: an int >= ``minimum`` (``"must be >= 1, got 0"`` otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def add_run_args(parser: argparse.ArgumentParser, scales: Dict[str, Dict], default: str = "small") -> None:
    """``--scale --epochs --max-steps --seed --threads --no-progress --out``."""
    group = parser.add_argument_group("run")
    group.add_argument("--scale", default=default, choices=sorted(scales),
                       help="model size, data and training length (see SCALES in the recipe)")
    group.add_argument("--epochs", type=at_least(1), help="override the scale's epochs")
    group.add_argument("--max-steps", type=at_least(1), help="stop after this many optimizer steps")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--threads", type=at_least(1), help="torch CPU threads (torch.set_num_threads)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--out", type=Path, required=True, help="output folder (results.json, model.pt)")
    group.add_argument("--check", action="store_true",
                       help="only check the arguments, the data and the output folder, then stop "
                            "(recipes/launch.sh does this before `accelerate launch`)")


def apply_run_args(args: argparse.Namespace, scales: Dict[str, Dict]) -> Dict:
    """Set the torch threads; the scale's settings with ``--epochs`` applied."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    scale = dict(scales[args.scale])
    if args.epochs is not None:
        scale["epochs"] = args.epochs
    return scale


def preflight(parser: argparse.ArgumentParser, args: argparse.Namespace, num_embeddings: int,
              embedding_dim: int, prepare: Callable[[compemb.EmbeddingSpec], Tuple[nn.Module, Any]]
              ) -> Optional[Tuple[compemb.EmbeddingSpec, Any]]:
    """Find everything that can be wrong before any training: the method flags, settings
    the ``num_embeddings x embedding_dim`` table cannot take, the output dir, the data.
    ``prepare(spec)`` loads the data and returns ``(model, data)``; ``--out`` must hold twice
    that model. A problem ends the program through ``parser.error``. Returns
    ``(spec, data)``, or None after printing what was checked when ``--check`` is given."""
    try:
        spec = spec_from_args(args)
        compemb.build_embedding(spec, num_embeddings, embedding_dim)  # before loading data
        check_output_dir(args.out, need_bytes=1 << 20)
        probe, data = prepare(spec)
        check_output_dir(args.out, need_bytes=2 * model_bytes(probe) + (1 << 20))
    except (ValueError, DataUnavailable) as err:
        parser.error(str(err))
    if args.check:
        print(f"checked: {spec.to_json()}, data and --out {args.out} are usable")
        return None
    return spec, data


# --------------------------------------------------------------------------- resuming

#: the file in ``--out`` holding the state of a run that has not finished
TRAINING_STATE = "train_state.pt"


def add_resume_args(parser: argparse.ArgumentParser, every: int = 200) -> None:
    """``--resume`` and ``--checkpoint-every`` (recipes with long training loops)."""
    group = parser.add_argument_group("resuming")
    group.add_argument("--resume", action="store_true",
                       help=f"continue the run whose {TRAINING_STATE} is in --out (written every "
                            f"--checkpoint-every steps, removed when the run finishes); starts "
                            f"from scratch when there is none. The settings must be the run's")
    group.add_argument("--checkpoint-every", type=at_least(1), default=every,
                       help=f"steps between saves of {TRAINING_STATE} (default {every})")


class TrainingState:
    """Periodic saves of a training loop's state to ``out/train_state.pt`` and the resume
    from it: the (unwrapped) model's and the optimizer's and scheduler's state dicts, the
    step, the loop's own position (``extra``: data offsets, recurrent state ...), torch's
    RNG state, and ``settings`` (what defines the run: a resume with other settings is a
    ``ValueError`` naming them). Written atomically by the main process; read with
    ``torch.load(weights_only=True)``. A resumed run makes the same steps as an
    uninterrupted one (same data order, dropout masks and learning rates)."""

    def __init__(self, out: Path, settings: Dict[str, Any], accelerator, every: int = 200,
                 resume: bool = False) -> None:
        self.path = Path(out) / TRAINING_STATE
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        self.accelerator = accelerator
        self.every = every
        self.resume = resume

    def load(self, model: nn.Module, optimizer, scheduler) -> Optional[Dict[str, Any]]:
        """With ``--resume`` and a saved state: restore it into ``model`` (unwrapped),
        ``optimizer`` and ``scheduler``; returns ``{"step": n, **extra}``. Else ``None``."""
        if not self.resume or not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("settings") != self.settings:
            theirs, ours = state.get("settings") or {}, self.settings
            differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise ValueError(f"--resume: {self.path} was written by a run with other settings "
                             f"({', '.join(differ)} differ); resume with that run's flags or "
                             f"use another --out")
        target = self.accelerator.unwrap_model(model)
        # the keys state_dict() gives (a compressed transformers model leaves out the
        # buffers of a table's aliases, which strict loading would call missing)
        if set(state["model"]) != set(target.state_dict()):
            raise ValueError(f"--resume: {self.path} does not hold this model's tensors; use "
                             f"another --out")
        target.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.accelerator.print(f"resumed from {self.path} at step {state['step']}")
        return {"step": state["step"], **state["extra"]}

    def maybe_save(self, step: int, model: nn.Module, optimizer, scheduler,
                   extra: Dict[str, Any]) -> None:
        """Save every ``every`` steps (main process; the others wait for it)."""
        if step % self.every:
            return
        if self.accelerator.is_main_process:
            state = {"settings": self.settings, "step": step, "extra": extra,
                     "model": self.accelerator.unwrap_model(model).state_dict(),
                     "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "rng": torch.get_rng_state()}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self.path)
        self.accelerator.wait_for_everyone()

    def finish(self) -> None:
        """The run is complete (its results are written): its state is no longer needed."""
        if self.accelerator.is_main_process:
            self.path.unlink(missing_ok=True)
