"""``CompressedEmbeddingConfig``: which embeddings of a transformers model to compress, and how.

It is a transformers ``QuantizationConfigMixin`` registered under the quant method
``"compemb"``, so ``from_pretrained(path, quantization_config=cfg)`` runs the compression
through transformers' own loading hooks, and ``save_pretrained`` writes it into
``config.json`` (key ``quantization_config``) for the checkpoint to rebuild itself.

The method's settings keep the names of the core layers (``compemb.tt.TTConfig``,
``compemb.dpq.DPQConfig`` ...) and are validated by them through
:class:`compemb.EmbeddingSpec`.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence

from transformers.utils.quantization_config import QuantizationConfigMixin

import compemb
from compemb import EmbeddingSpec

__all__ = ["CompressedEmbeddingConfig", "QUANT_METHOD", "SERIAL_MARKER", "OUTPUTS", "INITS",
           "PADDING_ROWS"]

#: the ``quant_method`` name under which the config and quantizer are registered
QUANT_METHOD = "compemb"
#: key that marks a serialized config (``config.json``); see :meth:`to_dict`
SERIAL_MARKER = "compemb_version"
OUTPUTS = ("tied", "untied", "dense")
INITS = ("pretrained", "random")
FORMS = ("train", "codebook")
PADDING_ROWS = ("zero", "stored")
_LOAD_NOTE = ("compressed by compemb: `import compemb_hf` (pip install 'compemb[hf]') before "
              "from_pretrained; without it transformers cannot rebuild the compressed layers")


class CompressedEmbeddingConfig(QuantizationConfigMixin):
    """Declarative spec of the compressed embeddings (and softmax) of a transformers model.

    Args:
        method: ``"tt"``, ``"tr"``, ``"dpq"`` (or any method registered in ``compemb``,
            ``"dense"`` included).
        rank, shape, num_factors: TT / TR settings (see ``compemb.tt.TTConfig``).
        num_codes, num_groups, variant, shared_subspace, distance_norm, temperature:
            DPQ settings (see ``compemb.dpq.DPQConfig``).
        modules: names of the ``nn.Embedding`` modules to compress
            (``["model.embed_tokens"]``); ``None`` (default) = the model's input embedding
            (``get_input_embeddings()``). Modules sharing a weight (T5 / BART / Marian
            shared source-target embeddings) are compressed into one shared table.
        output: the LM head (``get_output_embeddings()``): ``"tied"`` uses the input
            embedding's compressed table (the head must be tied to it), ``"untied"`` gives
            the head its own compressed table, ``"dense"`` leaves it as it is. ``None``
            (default): ``"tied"`` when the model ties its head, else ``"untied"``.
        form: ``"train"`` (default): the trainable layer (for DPQ the query table, keys and
            values); ``"codebook"`` (DPQ only): the exported inference form, codes packed
            at ``ceil(log2(num_codes))`` bits plus the values (see
            :func:`compemb_hf.export_codebooks`).
        init: ``"pretrained"`` (default) starts from the loaded dense table (TT-SVD /
            TR-SVD / k-means); ``"random"`` starts from the method's own initialisation.
            Ignored when loading a checkpoint that is already compressed.
        fit: set by :func:`compemb_hf.compress_pretrained` (not by hand): each table is a
            :class:`compemb.fit.FittedEmbedding` of this structure, a dict
            ``{"transform": bool, "exact_rows": int, "row_order": bool, "logit_bias":
            bool}`` (a ``d x d`` transform, rows kept exactly, a row permutation, a logit
            bias on the table that serves as the head), with ``"transform_rank": int`` when
            the transform is a Kronecker product plus that rank
            (:class:`compemb.fit.KroneckerLowRank`), and ``"residual_rows": {"input" |
            "head": {"bits": rows}}`` for tables with residual rows
            (:class:`compemb.fit.residual.ResidualRows`), and ``"row_scale": True`` when
            the head's table stores a per-token row scale
            (:meth:`compemb.fit.FittedEmbedding.set_row_scale`). ``None``: plain layers.
        padding_row: how the compressed tables treat the embedding's ``padding_idx`` row:
            ``"zero"`` (a row that is always zero, as a freshly initialised
            ``nn.Embedding``'s) or ``"stored"`` (an ordinary row, compressed like the
            others: torch returns a stored padding row as it is, and models that set the
            pad token to EOS, e.g. SmolLM2, need that row in the head). ``None`` (default):
            decided when the tables are built from dense weights (``"stored"`` when a padding
            row holds anything but zeros) and recorded; checkpoints without it: ``"zero"``.
        **options: any other setting of the method (``commitment`` for DPQ ...).

    Raises ``ValueError`` naming the bad field and what would work.
    """

    def __init__(self, method: str = "tt", *, rank: Any = None, shape: Any = None,
                 num_factors: Optional[int] = None, num_codes: Optional[int] = None,
                 num_groups: Optional[int] = None, variant: Optional[str] = None,
                 shared_subspace: Optional[bool] = None, distance_norm: Optional[bool] = None,
                 temperature: Optional[float] = None, modules: Optional[Sequence[str]] = None,
                 output: Optional[str] = None, init: Optional[str] = None,
                 form: str = "train", fit: Optional[Dict[str, Any]] = None,
                 padding_row: Optional[str] = None, **options: Any) -> None:
        options.pop("quant_method", None)
        options.pop(SERIAL_MARKER, None)
        options.pop("load_with", None)
        named = dict(rank=rank, shape=shape, num_factors=num_factors, num_codes=num_codes,
                     num_groups=num_groups, variant=variant, shared_subspace=shared_subspace,
                     distance_norm=distance_norm, temperature=temperature)
        merged = {k: v for k, v in named.items() if v is not None}
        merged.update({k: v for k, v in options.items() if v is not None})
        self.quant_method = QUANT_METHOD
        self.method = method
        self.options: Dict[str, Any] = merged
        self.modules: Optional[List[str]] = (
            modules if modules is None or isinstance(modules, (str, bytes)) else list(modules))
        self.output = output
        self.init = init
        self.form = form
        self.fit = None if fit is None else dict(fit)
        self.padding_row = padding_row
        self.post_init()

    # -- validation -----------------------------------------------------------------------
    def post_init(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a method name such as 'tt', 'tr' or 'dpq', got "
                             f"{self.method!r}")
        if self.method not in compemb.available_methods():
            raise ValueError(f"method {self.method!r} is not available; available methods: "
                             f"{compemb.available_methods()}")
        try:
            spec = EmbeddingSpec(self.method, self.options)
        except (ValueError, TypeError) as err:
            raise ValueError(f"CompressedEmbeddingConfig(method={self.method!r}): {err}") from None
        # keep every setting (defaults filled in) so that a saved config rebuilds the same layer
        self.options = {k: v for k, v in spec.to_dict().items() if k != "method"}
        if self.modules is not None:
            if (isinstance(self.modules, (str, bytes)) or not self.modules
                    or not all(isinstance(m, str) and m for m in self.modules)):
                raise ValueError(f"modules must be a non-empty list of module names (e.g. "
                                 f"['model.embed_tokens']) or None for the input embedding, got "
                                 f"{self.modules!r}")
        if self.output is not None and self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {list(OUTPUTS)} (or None: 'tied' when the "
                             f"model ties its head, else 'untied'), got {self.output!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {list(FORMS)}, got {self.form!r}")
        if self.form == "codebook" and self.method != "dpq":
            raise ValueError(f"form='codebook' is the exported form of method 'dpq', not of "
                             f"{self.method!r}; use form='train'")
        if self.padding_row is not None and self.padding_row not in PADDING_ROWS:
            raise ValueError(f"padding_row must be one of {list(PADDING_ROWS)} or None (decided "
                             f"from the dense weights), got {self.padding_row!r}")
        if self.init is not None and self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if self.fit is not None:
            keys = {"transform": bool, "exact_rows": int, "row_order": bool, "logit_bias": bool}
            optional = {"transform_rank": int, "residual_rows": dict, "row_scale": bool}
            if (not isinstance(self.fit, dict) or not set(keys) <= set(self.fit)
                    or not set(self.fit) <= set(keys) | set(optional)
                    or any(not isinstance(self.fit[k], t) or isinstance(self.fit[k], bool) != (t is bool)
                           or (t is int and self.fit[k] < 0)
                           for k, t in {**keys, **optional}.items() if k in self.fit)):
                raise ValueError(f"fit must be None or a dict {{'transform': bool, "
                                 f"'exact_rows': int >= 0, 'row_order': bool, 'logit_bias': "
                                 f"bool}}, optionally with 'transform_rank': int >= 0, "
                                 f"'residual_rows' and 'row_scale': bool, got {self.fit!r}")
            rows = self.fit.get("residual_rows", {})
            if not all(role in ("input", "head") and isinstance(per, dict) and all(
                    isinstance(b, str) and b.isdigit() and 1 <= int(b) <= 8
                    and isinstance(n, int) and not isinstance(n, bool) and n >= 0
                    for b, n in per.items()) for role, per in rows.items()):
                raise ValueError(f"fit['residual_rows'] must map 'input' / 'head' to "
                                 f"{{'bits' (1-8): rows >= 0}}, got {rows!r}")

    @property
    def spec(self) -> EmbeddingSpec:
        """The core spec of one compressed table."""
        return EmbeddingSpec(self.method, self.options)

    # -- serialization --------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """The ``config.json`` form. It has no ``quant_method`` key on purpose: transformers
        only warns about an unknown ``quant_method`` (and would then load the compressed
        checkpoint as a randomly initialised dense model), but raises a ``ValueError`` for a
        quantization config without one. ``import compemb_hf`` teaches transformers to read
        this form (see :mod:`compemb_hf.hooks`), so the checkpoint loads only with it."""
        return {
            SERIAL_MARKER: compemb.__version__,
            "load_with": _LOAD_NOTE,
            "method": self.method,
            **copy.deepcopy(self.options),
            "modules": None if self.modules is None else list(self.modules),
            "output": self.output,
            "init": self.init,
            "form": self.form,
            "fit": copy.deepcopy(self.fit),
            "padding_row": self.padding_row,
        }

    def to_diff_dict(self) -> Dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], return_unused_kwargs: bool = False,
                  **kwargs: Any):
        data = dict(config_dict)
        data.pop("quant_method", None)
        data.pop(SERIAL_MARKER, None)
        data.pop("load_with", None)
        config = cls(**data)
        if return_unused_kwargs:
            return config, kwargs
        return config

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressedEmbeddingConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return (f"CompressedEmbeddingConfig(method={self.method!r}, {fields}, "
                f"modules={self.modules!r}, output={self.output!r}, init={self.init!r}, "
                f"form={self.form!r}, fit={self.fit!r}, padding_row={self.padding_row!r})")
