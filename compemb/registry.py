"""The method registry: one entry per compression method.

Each method lives in its own sub-package (``compemb/tt``, ``compemb/tr``,
``compemb/dpq``, ...) with a ``config.py`` (a dataclass of the method's parameters,
validated in ``__post_init__``) and a ``layer.py`` (the ``nn.Module``), and registers
itself with one call in its ``__init__``::

    register_method("tt", config_cls=TTConfig, layer_cls=TTEmbedding, plan=plan_tt)

The declarative :class:`compemb.EmbeddingSpec` and :func:`compemb.build_embedding`
(and through them the transformers and fairseq integrations) only ever go through
this table, so a new method is found everywhere once it is registered.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from torch import Tensor, nn

__all__ = ["Method", "register_method", "get_method", "available_methods"]


@dataclass(frozen=True)
class Method:
    """A registered compression method.

    Attributes:
        name: the name used in specs, configs and command lines (``"tt"``).
        config_cls: dataclass holding the method's parameters; its field names are the
            keyword names of ``layer_cls`` after ``(num_embeddings, embedding_dim)``.
        layer_cls: the module; called as
            ``layer_cls(num_embeddings, embedding_dim, **fields, padding_idx=...)`` (and
            ``init_std=...``, the init rule of :mod:`compemb.init`) and,
            for a start from a trained table, ``layer_cls.from_dense(weight, **fields,
            padding_idx=...)``.
        plan: optional ``plan(num_embeddings, embedding_dim, target_ratio) -> config``
            returning the method's settings that reach ``target_ratio``.
    """

    name: str
    config_cls: type
    layer_cls: type
    plan: Optional[Callable[[int, int, float], Any]] = None

    def field_names(self) -> List[str]:
        return [f.name for f in dataclasses.fields(self.config_cls)]

    def make_config(self, options: Dict[str, Any]) -> Any:
        """The method's config from a dict of options, with a clear error for unknown keys."""
        unknown = sorted(set(options) - set(self.field_names()))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for method {self.name!r}; "
                f"its options are {self.field_names()}"
            )
        return self.config_cls(**options)

    def build(self, config: Any, num_embeddings: int, embedding_dim: int,
              padding_idx: Optional[int] = None, init_std: Optional[float] = None) -> nn.Module:
        """A fresh layer; with ``init_std`` it starts at that row std (the init rule of
        :mod:`compemb.init`; the layer class takes ``init_std`` as a keyword)."""
        extra = {} if init_std is None else {"init_std": init_std}
        return self.layer_cls(num_embeddings, embedding_dim, **_fields(config),
                              padding_idx=padding_idx, **extra)

    def from_dense(self, config: Any, weight: Tensor,
                   padding_idx: Optional[int] = None) -> nn.Module:
        return self.layer_cls.from_dense(weight, **_fields(config), padding_idx=padding_idx)


def _fields(config: Any) -> Dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


_METHODS: Dict[str, Method] = {}


def register_method(name: str, *, config_cls: type, layer_cls: type,
                    plan: Optional[Callable[[int, int, float], Any]] = None) -> Method:
    """Register a compression method under ``name`` (once; a second registration of the
    same name with other classes is an error)."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls for method {name!r} must be a dataclass, got {config_cls!r}")
    method = Method(name=name, config_cls=config_cls, layer_cls=layer_cls, plan=plan)
    old = _METHODS.get(name)
    if old is not None and (old.config_cls, old.layer_cls) != (config_cls, layer_cls):
        raise ValueError(f"a method named {name!r} is already registered ({old.layer_cls.__name__})")
    _METHODS[name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown method {name!r}; available methods: {available_methods()}"
        ) from None


def available_methods() -> List[str]:
    return sorted(_METHODS)
