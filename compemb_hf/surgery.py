"""Model surgery: replace a transformers model's embeddings (and LM head) by compemb layers.

Everything is planned and built first and swapped in at the end, so a failure (bad
module name, ranks the table cannot take, ...) leaves the model as it was.

Models with their own structure (the Transformer-XL of ``compemb_hf.transfo_xl``, with
adaptive inputs and softmax) define ``model.apply_compressed_embedding(config, *,
from_weights)``; :func:`compress` hands the whole surgery to that hook (see
:func:`compress`).
"""
from __future__ import annotations

import re
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from compemb import DPQEmbedding, OutputLayer, build_embedding, compress_embedding
from compemb.fit import FittedEmbedding

from .config import CompressedEmbeddingConfig

__all__ = ["compress", "apply_surgery", "ScaledEmbedding", "is_compressed", "compressed_layers",
           "restore_nonpersistent_buffers"]



class ScaledEmbedding(nn.Module):
    """A compressed table followed by a constant factor, for models whose embedding class
    scales its output (BART / mBART ``embed_scale``, Gemma ...).

    ``forward(LongTensor[...]) -> [..., embedding_dim]`` = ``embedding(ids) * embed_scale``.
    """

    def __init__(self, embedding: nn.Module, embed_scale: float) -> None:
        super().__init__()
        self.embedding = embedding
        self.embed_scale = float(embed_scale)
        self.num_embeddings = embedding.num_embeddings
        self.embedding_dim = embedding.embedding_dim
        self.padding_idx = getattr(embedding, "padding_idx", None)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.embedding(input_ids) * self.embed_scale

    def extra_repr(self) -> str:
        return f"embed_scale={self.embed_scale}"


@dataclass
class _Group:
    """One dense table and every place in the model that uses it."""

    weight: nn.Parameter
    paths: List[str]  # module paths holding an nn.Embedding with this weight
    canonical: str  # the path whose parameters are stored (the tying source)
    modules: Dict[str, nn.Module] = field(default_factory=dict)  # path -> original module
    layer: Optional[nn.Module] = None  # the new compressed layer


@dataclass
class _Plan:
    groups: List[_Group]
    head_paths: List[str]
    head: Optional[nn.Module]
    output: str  # "tied" | "untied" | "dense" | "none"


def _module_paths(model: nn.Module, target: nn.Module) -> List[str]:
    return [name for name, m in model.named_modules(remove_duplicate=False) if m is target]


def _embedding_names(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]


def _old_tied_sources(model: nn.Module) -> Set[str]:
    return set((getattr(model, "all_tied_weights_keys", None) or {}).values())


def _tied_names(model: nn.Module, name: str) -> Set[str]:
    """Every parameter name tied to ``name`` by the model's tying map (transitively).
    Inside ``from_pretrained`` the tying is not done yet, so identity is not enough."""
    mapping = getattr(model, "all_tied_weights_keys", None) or {}
    found, frontier = {name}, [name]
    while frontier:
        cur = frontier.pop()
        for k, v in mapping.items():
            for a, b in ((k, v), (v, k)):
                if a == cur and b not in found:
                    found.add(b)
                    frontier.append(b)
    return found


def _check_embedding(module: nn.Module, path: str) -> None:
    if is_compressed_module(module):
        raise ValueError(f"{path} is already compressed ({type(module).__name__}); compress a "
                         f"model with dense embeddings")
    if not isinstance(module, nn.Embedding):
        raise ValueError(f"modules: {path!r} is a {type(module).__name__}, not an nn.Embedding; "
                         f"name the model's embedding modules")
    overrides_forward = type(module).forward is not nn.Embedding.forward
    if overrides_forward and not hasattr(module, "embed_scale"):
        raise ValueError(
            f"{path} is a {type(module).__name__} with its own forward(), which compemb cannot "
            f"reproduce; supported are nn.Embedding and scaled embeddings (with embed_scale). "
            f"Give this model type an apply_compressed_embedding(config, from_weights=...) hook")
    if module.max_norm is not None:
        raise ValueError(f"{path} uses max_norm={module.max_norm}, which compressed tables do not "
                         f"support")


def plan_surgery(model: nn.Module, config: CompressedEmbeddingConfig) -> _Plan:
    """Find what to replace (no change to the model). ``ValueError`` for bad input."""
    if not isinstance(config, CompressedEmbeddingConfig):
        raise ValueError(f"config must be a compemb_hf.CompressedEmbeddingConfig, got "
                         f"{type(config).__name__}")
    if config.modules is None:
        try:
            inp = model.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            inp = None
        if inp is None:
            raise ValueError(
                f"{type(model).__name__} has no input embedding (get_input_embeddings() gives "
                f"none); name the nn.Embedding modules to compress with "
                f"CompressedEmbeddingConfig(modules=[...]) (embeddings in this model: "
                f"{_embedding_names(model)})")
        paths = _module_paths(model, inp)
        if not paths:
            raise ValueError(f"the input embedding of {type(model).__name__} is not a "
                             f"sub-module of it")
        targets = [(paths[0], inp)]
    else:
        targets = []
        for name in config.modules:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"modules: {name!r} is not a module of {type(model).__name__}; its embedding "
                    f"modules are {_embedding_names(model)}") from None
            targets.append((name, module))
    groups: List[_Group] = []
    sources = _old_tied_sources(model)
    for path, module in targets:
        _check_embedding(module, path)
        if any(g.weight is module.weight for g in groups):
            continue  # the same shared table named twice
        paths, modules = [], {}
        tied_to = _tied_names(model, path + ".weight")
        for name, m in model.named_modules(remove_duplicate=False):
            if not isinstance(m, nn.Embedding):
                continue
            if m.weight is module.weight or name + ".weight" in tied_to:
                _check_embedding(m, name)
                paths.append(name)
                modules[name] = m
        canonical = next((p for p in paths if p + ".weight" in sources), paths[0])
        groups.append(_Group(weight=module.weight, paths=paths, canonical=canonical,
                             modules=modules))

    try:
        head = model.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        head = None
    if head is None or config.output == "dense" or not isinstance(getattr(head, "weight", None),
                                                                  Tensor):
        if config.output in ("tied", "untied") and head is None:
            raise ValueError(f"output={config.output!r} but {type(model).__name__} has no LM head "
                             f"(get_output_embeddings() gives none); use output=None or 'dense'")
        return _Plan(groups, [], None, "dense" if head is not None else "none")
    head_paths = _module_paths(model, head)
    head_tied = set().union(*(_tied_names(model, p + ".weight") for p in head_paths))
    tied_group = next((g for g in groups if g.weight is head.weight
                       or any(p + ".weight" in head_tied for p in g.paths)), None)
    output = config.output or ("tied" if tied_group is not None else "untied")
    if output == "tied":
        if tied_group is None or tied_group is not groups[0]:
            raise ValueError(
                f"output='tied' but the LM head of {type(model).__name__} ({head_paths[0]}) is not "
                f"tied to the compressed input embedding (tie_word_embeddings="
                f"{getattr(model.config, 'tie_word_embeddings', None)}); use output='untied' to "
                f"give it its own compressed table, or 'dense'")
    if tuple(head.weight.shape) != (groups[0].weight.shape[0], groups[0].weight.shape[1]):
        if output == "tied":
            raise ValueError(f"the LM head {head_paths[0]} has shape {tuple(head.weight.shape)}, "
                             f"the input embedding {tuple(groups[0].weight.shape)}")
    return _Plan(groups, head_paths, head, output)


def _padding_rows_used(tables) -> bool:
    """Whether any ``(group, path, weight, padding_idx)`` table's padding row holds anything
    but zeros (a trained row, e.g. a pad token that is also EOS)."""
    return any(p is not None and bool(w[p].detach().ne(0).any()) for _, _, w, p in tables)


def _build_table(config: CompressedEmbeddingConfig, weight: Tensor, padding_idx: Optional[int],
                 from_weights: bool, head: bool = False, role: str = "input") -> nn.Module:
    spec = config.spec
    if config.fit is not None:
        if from_weights:
            raise ValueError("a config with fit=... describes a checkpoint written by "
                             "compemb_hf.compress_pretrained; to compress a dense model that "
                             "way, call compress_pretrained (or `compemb compress --ratio`)")
        plain = CompressedEmbeddingConfig.from_dict({**config.to_dict(), "fit": None})
        base = _build_table(plain, weight, None, False)
        with torch.device(weight.device if weight.device.type != "meta" else "cpu"):
            layer = FittedEmbedding.empty(base, config.fit["transform"],
                                          config.fit["exact_rows"], config.fit["row_order"],
                                          padding_idx=padding_idx,
                                          logit_bias=config.fit["logit_bias"] and head,
                                          transform_rank=config.fit.get("transform_rank"),
                                          residual_counts=config.fit.get("residual_rows", {})
                                          .get(role),
                                          row_scale=config.fit.get("row_scale", False)
                                          and head)
        return layer.to(weight.device) if weight.device.type == "meta" else layer
    if config.form == "codebook":
        return _build_codebook(config, weight, padding_idx, from_weights)
    if from_weights and config.init != "random":
        if weight.device.type == "meta":
            raise ValueError("init='pretrained' needs the loaded dense weights, but the model is "
                             "on the meta device; load it first or use init='random'")
        layer = compress_embedding(spec, weight.detach().float(), padding_idx=padding_idx)
    else:
        # the core's init rule (compemb.init): every method starts at the std of the table it
        # replaces (BERT: N(0, 0.02)); DPQ's own N(0, 1) gave a tied head logits ~50x too
        # large (a BERT MLM started at loss 16.6, not ln V), TT's Glorot std is the
        # vocabulary's, not the model's. On meta (inside from_pretrained: values about to be
        # loaded) there is no std to read, and the method's own init is kept.
        std = (float(weight.detach().float().std()) if weight.device.type != "meta"
               and weight.numel() > 1 else 0.0)
        layer = build_embedding(spec, int(weight.shape[0]), int(weight.shape[1]),
                                padding_idx=padding_idx, init_std=std if std > 0 else None)
    if weight.device.type != "meta":  # on meta (inside from_pretrained) it stays there
        layer = layer.to(weight.device)
    if weight.dtype != torch.float32 and weight.is_floating_point():
        for p in layer.parameters():  # keep the model's float dtype (bf16 / fp16 checkpoints)
            if p.is_floating_point():
                p.data = p.data.to(weight.dtype)
    return layer


def _build_codebook(config: CompressedEmbeddingConfig, weight: Tensor,
                    padding_idx: Optional[int], from_weights: bool) -> nn.Module:
    from compemb.dpq import CodebookEmbedding

    o = config.options
    if from_weights:
        config_train = CompressedEmbeddingConfig(config.method, **o, init=config.init)
        return _build_table(config_train, weight, padding_idx, True).eval().export()
    with torch.device("cpu"):  # codes are checked on creation: not on the meta device
        return CodebookEmbedding.empty(
            int(weight.shape[0]), int(weight.shape[1]), o["num_codes"], o["num_groups"],
            shared_subspace=o["shared_subspace"], padding_idx=padding_idx,
            dtype=weight.dtype if weight.is_floating_point() else torch.float32)


def _replacement(group: _Group, path: str) -> nn.Module:
    original = group.modules[path]
    scale = getattr(original, "embed_scale", None)
    if scale is not None:
        scale = float(scale)
        if scale != 1.0:
            return ScaledEmbedding(group.layer, scale)
    return group.layer


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, name, module)


def apply_surgery(model: nn.Module, config: CompressedEmbeddingConfig, *, from_weights: bool,
                  progress: bool = False, build: Optional[Any] = None) -> Dict[str, nn.Module]:
    """Replace the embeddings and head planned from ``config``; returns ``{path: layer}`` of
    the new compressed tables. ``from_weights``: initialise from the current dense tables
    (``config.init`` permitting); otherwise the layers are fresh (their values are about to
    be loaded from a compressed checkpoint). ``build(path, weight, padding_idx, role)``
    (``role``: ``"input"`` or ``"head"``), if given, makes each table instead (what
    :func:`compemb_hf.compress_pretrained` uses to put in its fitted tables)."""
    hook = getattr(model, "apply_compressed_embedding", None)
    if callable(hook):
        # model types with their own structure (compemb_hf.transfo_xl) do their own surgery
        result = hook(config, from_weights=from_weights)
        _install_guards(model)
        return dict(result or {})
    plan = plan_surgery(model, config)
    if config.output is None and plan.output in ("tied", "untied"):
        config.output = plan.output  # recorded, so that a saved checkpoint rebuilds the same
    tables = [(g, g.canonical, g.weight, g.modules[g.canonical].padding_idx) for g in plan.groups]
    untied_head = plan.output == "untied"
    if untied_head:
        tables.append((None, plan.head_paths[0], plan.head.weight, None))
    padding_row = config.padding_row
    if padding_row is None and from_weights and all(w.device.type != "meta" for _, _, w, _ in tables):
        padding_row = "stored" if _padding_rows_used(tables) else "zero"
    if padding_row == "stored":  # an ordinary row (e.g. pad = EOS, which the head predicts)
        tables = [(g, path, w, None) for g, path, w, _ in tables]
    iterator = tables
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(tables, desc=f"compressing ({config.method})", unit="table")
    built: List[nn.Module] = []
    for group, path, weight, padding_idx in iterator:  # build everything before changing anything
        is_head = group is None or (plan.output == "tied" and group is plan.groups[0])
        if build is not None:
            built.append(build(path, weight, padding_idx, "input" if group is not None else "head"))
        else:
            built.append(_build_table(config, weight, padding_idx, from_weights, head=is_head,
                                      role="input" if group is not None else "head"))
    if padding_row is not None:
        config.padding_row = padding_row  # recorded, so that a checkpoint rebuilds the same
    for (group, _, _, _), layer in zip(tables, built):
        layer.train(model.training)
        if group is not None:
            group.layer = layer
    head_module = None
    if plan.output in ("tied", "untied"):
        table = plan.groups[0].layer if plan.output == "tied" else built[-1]
        head_module = OutputLayer(table, bias=False, tied=plan.output == "tied")
        head_module.train(model.training)
        bias = getattr(plan.head, "bias", None)
        if isinstance(bias, nn.Parameter):
            head_module.bias = bias  # same Parameter: ties such as BERT's decoder.bias survive
        if plan.head.weight.device.type != "meta":
            head_module.to(plan.head.weight.device)

    # ---- swap (nothing below raises for valid models) ----
    old_tied = _collect_tied(model)
    for g in plan.groups:
        for path in g.paths:
            _set_module(model, path, _replacement(g, path))
    if head_module is not None:
        for path in plan.head_paths:
            _set_module(model, path, head_module)
    _rewrite_tying(model, old_tied)
    _install_guards(model)
    result = {g.canonical: g.layer for g in plan.groups}
    if untied_head:
        result[plan.head_paths[0] + ".embedding"] = built[-1]
    return result


# ---------------------------------------------------------------- tying bookkeeping
def _pretrained_submodels(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    from transformers import PreTrainedModel

    return [(n, m) for n, m in model.named_modules() if isinstance(m, PreTrainedModel)]


def _collect_tied(model: nn.Module) -> Dict[str, Dict[str, str]]:
    """Every PreTrainedModel sub-module's own (expanded) tying, before the swap."""
    out = {}
    for name, sub in _pretrained_submodels(model):
        try:
            out[name] = dict(sub.get_expanded_tied_weights_keys(all_submodels=False))
        except Exception:  # noqa: BLE001  (a mapping naming modules that are gone)
            out[name] = dict(getattr(sub, "all_tied_weights_keys", None) or {})
    return out


def _rewrite_tying(model: nn.Module, old_tied: Dict[str, Dict[str, str]]) -> None:
    """Keep transformers' tying consistent with the compressed modules now in ``model``.

    * entries of every sub-model whose tensors no longer exist are dropped;
    * each compressed layer reachable under several paths (shared source/target
      embeddings, a tied head is not one: it only references the table) gets
      ``{alias.param: canonical.param}`` entries (parameters only; canonical = first path
      in module order) on the top model: ``tie_weights()`` finds them, saving drops the
      aliases, loading marks them as present;
    * persistent buffers of aliases (DPQ codes ...) are left out of ``state_dict()``.
    """
    paths: Dict[int, List[str]] = {}
    layers: Dict[int, nn.Module] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if is_compressed_module(m):
            paths.setdefault(id(m), []).append(name)
            layers[id(m)] = m
    new_entries: Dict[str, str] = {}
    alias_buffers: List[str] = []
    for key, names in paths.items():
        layer = layers[key]
        params = [n for n, _ in layer.named_parameters()]
        buffers = [n for n, _ in layer.named_buffers() if _is_persistent(layer, n)]
        canon = names[0]
        for alias in names[1:]:
            for n in params:
                new_entries[f"{alias}.{n}"] = f"{canon}.{n}"
            alias_buffers += [f"{alias}.{n}" for n in buffers]
    for name, sub in _pretrained_submodels(model):
        # entries whose tensors still exist (e.g. BERT's decoder.bias -> predictions.bias)
        names = {n for n, _ in sub.named_parameters(remove_duplicate=False)}
        kept = {k: v for k, v in old_tied.get(name, {}).items() if k in names and v in names}
        if name == "":
            kept.update(new_entries)
            sub._tied_weights_keys = {_exact(k): _exact(v) for k, v in kept.items()}
        else:
            sub._tied_weights_keys = {_exact(k): _exact(v) for k, v in kept.items()} or None
        sub.all_tied_weights_keys = dict(kept)
    # the top model's expanded mapping covers the sub-models, as post_init builds it
    top_all = {}
    for name, sub in _pretrained_submodels(model):
        prefix = name + "." if name else ""
        top_all.update({prefix + k: prefix + v for k, v in sub.all_tied_weights_keys.items()})
    model.all_tied_weights_keys = top_all
    model._compemb_alias_buffers = sorted(alias_buffers)
    if alias_buffers and not getattr(model, "_compemb_state_hook", False):
        model.register_state_dict_post_hook(_drop_alias_buffers)
        model._compemb_state_hook = True


def _drop_alias_buffers(module: nn.Module, state_dict: Dict[str, Any], prefix: str,
                        local_metadata: Any) -> None:
    """``state_dict`` post-hook: a buffer of a table shared under several paths is listed
    once (buffers cannot be tied like parameters; listing them under every path would
    have transformers re-create the "missing" aliases over the loaded values)."""
    for key in getattr(module, "_compemb_alias_buffers", ()):
        state_dict.pop(prefix + key, None)


def _exact(name: str) -> str:
    return re.escape(name) + "$"


def _is_persistent(module: nn.Module, buffer_name: str) -> bool:
    owner_name, _, leaf = buffer_name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return leaf not in owner._non_persistent_buffers_set


# ---------------------------------------------------------------- after loading
def restore_nonpersistent_buffers(model: nn.Module, config: CompressedEmbeddingConfig) -> None:
    """Modules created on the meta device while transformers loads a checkpoint get their
    non-persistent buffers back as uninitialised memory: copy them from a freshly built
    layer of the same settings (these buffers depend only on the settings)."""
    spec = config.spec
    for _, layer in compressed_layers(model).items():
        ref = None
        for name, buf in list(layer.named_buffers()):
            if _is_persistent(layer, name):
                continue
            if ref is None:
                ref = build_embedding(spec, layer.num_embeddings, layer.embedding_dim,
                                      padding_idx=getattr(layer, "padding_idx", None))
            owner_name, _, leaf = name.rpartition(".")
            owner = layer.get_submodule(owner_name) if owner_name else layer
            value = ref.get_buffer(name).to(device=buf.device if buf.device.type != "meta"
                                            else "cpu")
            owner.register_buffer(leaf, value, persistent=False)


# ---------------------------------------------------------------- queries and guards
def is_compressed_module(module: nn.Module) -> bool:
    """A compemb layer: an instance of a registered method's layer class, or any module
    with the layer contract's ``materialize()`` and ``storage()`` (DPQ's exported
    ``CodebookEmbedding``)."""
    from compemb import available_methods, get_method

    classes = tuple(get_method(name).layer_cls for name in available_methods())
    return isinstance(module, classes) or (callable(getattr(module, "materialize", None))
                                           and callable(getattr(module, "storage", None)))


def compressed_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{path: layer}`` for every distinct compemb layer in ``model`` (first path); the
    layers inside one (a :class:`compemb.fit.FittedEmbedding`'s base) are its own."""
    out, seen = {}, set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in out):
            continue
        if is_compressed_module(m) and id(m) not in seen:
            seen.add(id(m))
            out[name] = m
    return out


def is_compressed(model: nn.Module) -> bool:
    return bool(compressed_layers(model))


def _refuse_resize(self, *args: Any, **kwargs: Any):
    raise ValueError(
        "resize_token_embeddings cannot resize a compressed embedding: a TT/TR/DPQ table is "
        "built for a fixed vocabulary. Resize the dense model first and compress it after: "
        "model.dequantize() (or compemb_hf.decompress(model)) gives the dense tables back, "
        "then resize_token_embeddings(n), then compemb_hf.compress(model, config).")


def _tolerant_init_weights(self, module: nn.Module) -> None:
    """``_init_weights`` of a compressed model: model classes initialise their embeddings
    by name (T5: ``init.normal_(module.shared.weight)``), and a compressed table has no
    ``.weight``; such a module keeps the values it has (loaded, or compressed).

    Only that one error is absorbed: an ``AttributeError`` for the attribute ``weight``
    of a compemb module (a compressed table, its ``ScaledEmbedding`` wrapper or an
    ``OutputLayer`` head) inside ``module``. Any other error, whatever its text, is
    raised."""
    try:
        type(self)._init_weights(self, module)
    except AttributeError as err:
        if not _is_missing_table_weight(err, module):
            raise


def _is_missing_table_weight(err: AttributeError, module: nn.Module) -> bool:
    """``err`` is Python's "``<compemb module>`` has no attribute ``weight``" about a
    module inside ``module`` (torch's ``Module.__getattr__`` sets ``name`` and ``obj``)."""
    owner = getattr(err, "obj", None)
    if getattr(err, "name", None) != "weight" or not isinstance(owner, nn.Module):
        return False
    if not (is_compressed_module(owner) or isinstance(owner, (ScaledEmbedding, OutputLayer))):
        return False
    return any(m is owner for m in module.modules())


def _save_pretrained(self, save_directory, *args: Any, compemb_form: Optional[str] = None,
                     **kwargs: Any):
    """``save_pretrained`` of a compressed model: small by default. A model that is not
    being trained (``model.training`` is False, as after ``from_pretrained``) saves its
    inference form: DPQ layers as packed codes and values (``export_codebooks``), which
    reload as such; a model in training mode (a Trainer checkpoint) saves the training
    form, to resume. ``compemb_form="train"`` / ``"inference"`` chooses explicitly. The
    model itself is not changed (the export is made on a copy)."""
    form = compemb_form or ("train" if self.training else "inference")
    if form not in ("train", "inference"):
        raise ValueError(f"compemb_form must be 'train' or 'inference', got {compemb_form!r}")
    save = type(self).save_pretrained
    if form == "train" or not any(isinstance(m, DPQEmbedding) for m in self.modules()):
        return save(self, save_directory, *args, **kwargs)
    import copy

    exported = export_codebooks(copy.deepcopy(self))
    return save(exported, save_directory, *args, **kwargs)


def _install_guards(model: nn.Module) -> None:
    from transformers import PreTrainedModel

    model.resize_token_embeddings = types.MethodType(_refuse_resize, model)
    # transformers refuses .half() / .float() on any "quantized" model; compressed tables
    # are ordinary floating-point parameters and cast like the rest of the model
    model.half = types.MethodType(nn.Module.half, model)
    model.float = types.MethodType(nn.Module.float, model)
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel):
            sub._init_weights = types.MethodType(_tolerant_init_weights, sub)


class _ScaledDenseEmbedding(nn.Embedding):
    """A dense table with a constant output factor (what a ScaledEmbedding decompresses to)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int],
                 embed_scale: float) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.embed_scale = float(embed_scale)

    def forward(self, input_ids: Tensor) -> Tensor:
        return super().forward(input_ids) * self.embed_scale


def decompress(model: nn.Module) -> nn.Module:
    """Turn every compressed table back into a dense ``nn.Embedding`` holding the table
    it stands for (``materialize()``), and tied heads back into ``nn.Linear`` sharing that
    weight; the model is then an ordinary transformers model again (also reached through
    transformers' ``model.dequantize()``). Use it to resize the vocabulary
    (``decompress``, ``resize_token_embeddings``, ``compress`` again). Returns ``model``.

    The model classes' own tying comes back: a head compressed with ``output="untied"``
    in a model whose config ties it is tied again by the next ``tie_weights()``."""
    layers = compressed_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no compressed embedding to decompress")
    dense: Dict[int, nn.Embedding] = {}
    for layer in layers.values():
        with torch.no_grad():
            table = layer.materialize().detach().clone()
        emb = nn.Embedding(layer.num_embeddings, layer.embedding_dim,
                           padding_idx=getattr(layer, "padding_idx", None),
                           device=table.device, dtype=table.dtype)
        emb.weight.data.copy_(table)
        emb.train(layer.training)
        dense[id(layer)] = emb
    swaps: List[Tuple[str, nn.Module]] = []
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, ScaledEmbedding) and id(m.embedding) in dense:
            inner = dense[id(m.embedding)]
            scaled = _ScaledDenseEmbedding(inner.num_embeddings, inner.embedding_dim,
                                           inner.padding_idx, m.embed_scale)
            scaled.to(inner.weight.device)
            scaled.weight = inner.weight  # the same table under every path
            swaps.append((name, scaled))
        elif id(m) in dense:
            swaps.append((name, dense[id(m)]))
        elif isinstance(m, OutputLayer) and id(m.table) in dense:
            table = dense[id(m.table)]
            logit_bias = getattr(m.table, "logit_bias", None)  # a FittedEmbedding's
            head = nn.Linear(m.embedding_dim, m.num_embeddings,
                             bias=m.bias is not None or logit_bias is not None,
                             device=table.weight.device, dtype=table.weight.dtype)
            if m.tied:
                head.weight = table.weight
            else:
                head.weight.data.copy_(table.weight.data)
            if logit_bias is not None:
                with torch.no_grad():
                    extra = 0 if m.bias is None else m.bias.detach()
                    head.bias.copy_(logit_bias.detach() + extra)
            elif m.bias is not None:
                head.bias = m.bias
            swaps.append((name, head))
    swaps = [(n, mod) for n, mod in swaps if not any(n.startswith(o + ".") for o, _ in swaps)]
    for name, module in swaps:
        _set_module(model, name, module)
    from transformers import PreTrainedModel

    for sub in model.modules():  # back to the classes' own tying and methods
        if isinstance(sub, PreTrainedModel):
            for attr in ("_tied_weights_keys", "_init_weights", "resize_token_embeddings",
                         "half", "float", "save_pretrained"):
                sub.__dict__.pop(attr, None)
    for _, sub in reversed(_pretrained_submodels(model)):
        sub.all_tied_weights_keys = sub.get_expanded_tied_weights_keys(all_submodels=False)
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    model._compemb_alias_buffers = []
    for attr in ("hf_quantizer", "quantization_method"):
        model.__dict__.pop(attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel):
            sub.config._is_quantized = False
    return model


def export_codebooks(model: nn.Module) -> nn.Module:
    """Replace every DPQ layer of a compressed model by its exported inference form
    (``CodebookEmbedding``: codes packed at ``ceil(log2(num_codes))`` bits, values), in
    place, with the same outputs as the DPQ layers in eval mode. ``save_pretrained`` then
    writes only codes and values; the checkpoint reloads in that form. Returns ``model``."""
    from compemb.dpq import DPQEmbedding

    from .quantizer import mark_compressed

    config = getattr(model.config, "quantization_config", None)
    if not isinstance(config, CompressedEmbeddingConfig) or config.method != "dpq":
        raise ValueError("export_codebooks needs a model compressed with method='dpq'")
    if config.form == "codebook":
        return model
    swaps = {id(m): m.export() for m in compressed_layers(model).values()
             if isinstance(m, DPQEmbedding)}
    old_tied = _collect_tied(model)
    for name, m in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(m.named_children()):
            if id(child) in swaps:
                setattr(m, child_name, swaps[id(child)])
        tied = getattr(m, "_tied", None)
        if isinstance(m, OutputLayer) and tied and id(tied[0]) in swaps:
            m._tied = [swaps[id(tied[0])]]
    _rewrite_tying(model, old_tied)
    config = CompressedEmbeddingConfig.from_dict({**config.to_dict(), "form": "codebook"})
    mark_compressed(model, config)
    return model


def compress(model: nn.Module, config: CompressedEmbeddingConfig, *, progress: bool = False):
    """Compress the embeddings of a model already in memory (built from a config, or loaded
    dense), in place, the same surgery as ``from_pretrained(..., compressed_embedding=config)``.

    The model is then marked as compressed for transformers (``model.hf_quantizer``,
    ``config.quantization_config``), so ``save_pretrained`` writes a compressed checkpoint
    that ``from_pretrained`` rebuilds. A model type may take over the surgery by defining
    ``apply_compressed_embedding(config, *, from_weights: bool)`` (it must build before it
    swaps, and return ``{path: layer}``). Returns ``model``.

    Raises ``ValueError`` (model unchanged) for a model without an input embedding, a
    module name that does not exist, or settings the table cannot take.
    """
    import copy

    from .quantizer import mark_compressed

    config = copy.deepcopy(config)
    if is_compressed(model):
        raise ValueError(f"{type(model).__name__} is already compressed; compress a model with "
                         f"dense embeddings")
    apply_surgery(model, config, from_weights=True, progress=progress)
    mark_compressed(model, config)
    return model


# pickling a bound method looks the name up again on the instance
_refuse_resize.__name__ = "resize_token_embeddings"
_save_pretrained.__name__ = "save_pretrained"
_tolerant_init_weights.__name__ = "_init_weights"
