"""The plugin's command-line flags and their mapping onto :class:`compemb.EmbeddingSpec`.

The flags are declared once, as the dataclass :class:`CompembFlags` (fairseq turns its
fields into ``--emb-method``, ``--emb-rank`` ...). Models with an argparse ``add_args``
add them with :func:`add_flags`; the language model's dataclass config inherits them.

Everything here is a pure function of the parsed arguments: no module is built.
(No ``from __future__ import annotations``: fairseq reads the field types at runtime.)
"""
import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass

import compemb

__all__ = ["CompembFlags", "add_flags", "load_methods", "spec_from_args", "flag_settings",
           "resolve_softmax", "SOFTMAX_MODES"]

SOFTMAX_MODES = ("tied", "untied", "dense")

# flag -> the keyword of the method's layer it sets (compemb.tt.TTConfig, compemb.dpq.DPQConfig ...)
FLAG_TO_OPTION = {
    "emb_rank": "rank",
    "emb_shape": "shape",
    "emb_num_factors": "num_factors",
    "emb_codes": "num_codes",
    "emb_groups": "num_groups",
    "emb_variant": "variant",
    "emb_shared_subspace": "shared_subspace",
    "emb_temperature": "temperature",
    "emb_commitment": "commitment",
    "emb_no_distance_norm": "distance_norm",
}

# flags that switch an option off: set -> the option is False
INVERTED_FLAGS = {"emb_no_distance_norm"}

# record keys of checkpoints written before these options had flags -> today's flag
LEGACY_RECORD_KEYS = {"(temperature)": "--emb-temperature", "(commitment)": "--emb-commitment",
                      "(distance_norm)": "--emb-no-distance-norm"}


@dataclass
class CompembFlags(FairseqDataclass):
    """Compression of the token embedding and of the output (softmax) layer."""

    emb_method: Optional[str] = field(default=None, metadata={
        "help": "compression of the token embedding tables: dense, tt (Tensor-Train), "
                "tr (Tensor-Ring) or dpq (Differentiable Product Quantization)"})
    emb_rank: Optional[str] = field(default=None, metadata={
        "help": "tt/tr: the TT rank, one integer ('16') or the N-1 inner ranks ('8,16')"})
    emb_shape: Optional[str] = field(default=None, metadata={
        "help": "tt/tr: the factorisation I1,..,IN x J1,..,JN of the vocabulary and the "
                "embedding dimension ('25,30,40x4,8,8'; prod(I) >= vocabulary size, "
                "prod(J) = embedding dim); default: chosen automatically"})
    emb_num_factors: Optional[int] = field(default=None, metadata={
        "help": "tt/tr: number of factors N when --emb-shape is not given (default 3)"})
    emb_codes: Optional[int] = field(default=None, metadata={
        "help": "dpq: codes per group K (e.g. 32)"})
    emb_groups: Optional[int] = field(default=None, metadata={
        "help": "dpq: groups D the embedding dimension is split into (must divide it)"})
    emb_variant: Optional[str] = field(default=None, metadata={
        "help": "dpq: 'sx' (softmax straight-through) or 'vq' (vector quantisation)"})
    emb_shared_subspace: bool = field(default=False, metadata={
        "help": "dpq: one key/value codebook for all groups"})
    emb_temperature: Optional[float] = field(default=None, metadata={
        "help": "dpq, variant sx: softmax temperature of the straight-through backward "
                "(default 1.0; an error with --emb-variant vq)"})
    emb_commitment: Optional[float] = field(default=None, metadata={
        "help": "dpq, variant vq: weight of the commitment loss (default 0; an error with "
                "--emb-variant sx)"})
    emb_no_distance_norm: bool = field(default=False, metadata={
        "help": "dpq: no batch normalisation of the code scores (distance_norm=False)"})
    emb_codebook: bool = field(default=False, metadata={
        "help": "dpq: the model holds the inference form of its tables (packed codes and "
                "values, no query table); set in the checkpoints written by "
                "`python -m fairseq_plugin.export`, for generate/eval-lm/validate"})
    softmax: Optional[str] = field(default=None, metadata={
        "help": "output layer: tied (the input embedding's compressed table), untied (a "
                "second compressed table of the same shape) or dense (a plain matrix); "
                "default: tied when the model ties input and output embeddings "
                "(--share-decoder-input-output-embed, --share-all-embeddings, RoBERTa "
                "without --untie-weights-roberta), untied otherwise"})


FLAG_NAMES = [f.name for f in dataclasses.fields(CompembFlags) if not f.name.startswith("_")]


def add_flags(parser) -> None:
    """Add the ``--emb-*`` and ``--softmax`` flags to an argparse parser."""
    gen_parser_from_dataclass(parser, CompembFlags())


def load_methods() -> List[str]:
    """Import the core's method packages that exist (each registers itself) and return
    the registered method names."""
    for name in ("tt", "tr", "dpq"):
        try:
            importlib.import_module(f"compemb.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"compemb.{name}":
                raise
    return compemb.available_methods()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_ints(flag: str, text: Any, example: str) -> List[int]:
    if isinstance(text, int) and not isinstance(text, bool):
        return [text]
    if isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        parts = [p.strip() for p in str(text).split(",")]
    try:
        return [int(p) for p in parts]
    except (TypeError, ValueError):
        raise ValueError(f"{flag} must be comma-separated integers such as {example!r}, got "
                         f"{text!r}") from None


def parse_rank(text: Any) -> Any:
    """``'16' -> 16``, ``'8,16' -> [8, 16]``."""
    ranks = _parse_ints("--emb-rank", text, "16 or 8,16")
    return ranks[0] if len(ranks) == 1 else ranks


def parse_shape(text: Any) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """``'25,30,40x4,8,8' -> ((25, 30, 40), (4, 8, 8))``."""
    if isinstance(text, (list, tuple)) and len(text) == 2:
        rows, cols = text
    else:
        halves = str(text).lower().split("x")
        if len(halves) != 2:
            raise ValueError(f"--emb-shape must be the vocabulary factors and the dimension "
                             f"factors separated by 'x', such as '25,30,40x4,8,8', got {text!r}")
        rows, cols = halves
    return (tuple(_parse_ints("--emb-shape", rows, "25,30,40x4,8,8")),
            tuple(_parse_ints("--emb-shape", cols, "25,30,40x4,8,8")))


_PARSERS = {"emb_rank": parse_rank, "emb_shape": parse_shape}


def flag_settings(args: Any) -> Dict[str, Any]:
    """The compression flags as given (``{"--emb-method": "tt", "--emb-rank": "16"}``),
    unset ones left out (for messages)."""
    out = {}
    for name in FLAG_NAMES:
        value = getattr(args, name, None)
        if value is None or value is False:
            continue
        out[_flag(name)] = value if isinstance(value, (bool, int, float)) else str(value)
    return out


def spec_from_args(args: Any) -> compemb.EmbeddingSpec:
    """The :class:`compemb.EmbeddingSpec` the flags describe.

    Raises ``ValueError`` naming the flag: a missing or unknown ``--emb-method``, a flag
    that does not apply to the method, a malformed or out-of-range value.
    """
    methods = load_methods()
    method = getattr(args, "emb_method", None)
    if method is None:
        raise ValueError(f"--emb-method is required by the compemb models: one of {methods} "
                         f"(dense keeps fairseq's nn.Embedding)")
    if method not in methods:
        raise ValueError(f"--emb-method {method!r} is not a known method; use one of {methods}")
    entry = compemb.get_method(method)
    fields = entry.field_names()
    options: Dict[str, Any] = {}
    for name, option in FLAG_TO_OPTION.items():
        value = getattr(args, name, None)
        if value is None or value is False:
            continue
        if option not in fields:
            usable = [_flag(n) for n, o in FLAG_TO_OPTION.items() if o in fields]
            raise ValueError(
                f"{_flag(name)} does not apply to --emb-method {method}; "
                + (f"its flags are {', '.join(usable)}" if usable else f"{method} takes no "
                   f"--emb-* settings") + f" (drop {_flag(name)} or pick a method it applies to)")
        options[option] = (False if name in INVERTED_FLAGS
                           else _PARSERS.get(name, lambda v: v)(value))
    if getattr(args, "emb_codebook", False) and method != "dpq":
        raise ValueError(f"--emb-codebook is the inference form of --emb-method dpq; drop it "
                         f"for --emb-method {method}")
    try:
        return compemb.EmbeddingSpec(method, options)
    except TypeError as err:  # a required setting of the method is missing
        needed = [_flag(n) for n, o in FLAG_TO_OPTION.items()
                  if o in fields and o not in options]
        raise ValueError(f"--emb-method {method}: {err}; set it with {', '.join(needed)}") from None
    except ValueError as err:
        raise ValueError(f"--emb-method {method} {_describe(options)}: "
                         f"{_flagify(str(err))}") from None


def _describe(options: Dict[str, Any]) -> str:
    inverse = {o: _flag(n) for n, o in FLAG_TO_OPTION.items()}
    return " ".join(f"{inverse.get(k, k)} {v}" for k, v in options.items()).strip()


def _flagify(message: str) -> str:
    """Append which flag sets each option a core error message names."""
    named = [f"{o}={_flag(n)}" for n, o in FLAG_TO_OPTION.items() if o in message]
    return message + (f" (flags: {', '.join(named)})" if named else "")


def describe_layer_error(err: ValueError, args: Any, what: str, num_embeddings: int,
                         embedding_dim: int) -> ValueError:
    """A core layer's ``ValueError`` for a ``what`` table, restated in terms of flags."""
    method = getattr(args, "emb_method", None)
    given = " ".join(f"{k} {v}" for k, v in flag_settings(args).items()
                     if k not in ("--emb-method", "--softmax"))
    hint = ""
    try:
        spec = compemb.plan(num_embeddings, embedding_dim, method, 10.0)
        hint = f"; for example {_as_flags(spec)} reaches 10x for this table"
    except (ValueError, TypeError):
        pass
    return ValueError(f"--emb-method {method} {given}: cannot compress the {what} "
                      f"({num_embeddings} x {embedding_dim}): {_flagify(str(err))}{hint}")


def _as_flags(spec: compemb.EmbeddingSpec) -> str:
    inverse = {o: _flag(n) for n, o in FLAG_TO_OPTION.items()}
    parts = [f"--emb-method {spec.method}"]
    for key, value in spec.options.items():
        if key == "distance_norm":
            if value is False:
                parts.append(inverse[key])
            continue
        if key not in inverse or value is None or value is False or (
                key == "num_factors" and spec.options.get("shape") is not None):
            continue
        if key == "shape":
            value = "x".join(",".join(str(v) for v in half) for half in value)
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        parts.append(inverse[key] if value is True else f"{inverse[key]} {value}")
    return " ".join(parts)


def resolve_softmax(args: Any, tie_flags: Dict[str, bool],
                    untie_flags: Optional[Dict[str, bool]] = None, default: str = "untied") -> str:
    """The output layer mode from ``--softmax`` and the model's own tying flags.

    Args:
        tie_flags: the model's flags that tie the output layer to the input embedding,
            with whether each is set (``{"--share-decoder-input-output-embed": True}``).
        untie_flags: flags that keep them apart (``{"--untie-weights-roberta": False}``).
        default: the mode when neither ``--softmax`` nor any of these flags is set.
    Returns ``"tied"``, ``"untied"`` or ``"dense"``; ``ValueError`` when ``--softmax``
    contradicts one of these flags or names no mode.
    """
    mode = getattr(args, "softmax", None)
    tied_by = [name for name, on in tie_flags.items() if on]
    untied_by = [name for name, on in (untie_flags or {}).items() if on]
    if mode is None:
        return "tied" if tied_by else "untied" if untied_by else default
    if mode not in SOFTMAX_MODES:
        raise ValueError(f"--softmax {mode!r} is not a mode; use one of {list(SOFTMAX_MODES)}")
    if mode == "tied" and untied_by:
        raise ValueError(
            f"--softmax tied reuses the input embedding's table in the output layer, but "
            f"{untied_by[0]} asks for a separate one; drop {untied_by[0]} or use --softmax "
            f"untied (a second compressed table) or --softmax dense")
    if mode != "tied" and tied_by:
        raise ValueError(
            f"--softmax {mode} asks for an output layer with its own "
            f"{'compressed' if mode == 'untied' else 'dense'} table, but {tied_by[0]} ties "
            f"the output layer to the input embedding; drop {tied_by[0]} or use --softmax tied")
    return mode
