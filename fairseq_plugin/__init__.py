"""compemb for fairseq: ``fairseq-train --user-dir fairseq_plugin ...``.

Importing this package (fairseq does it for ``--user-dir``)
- registers the models ``compemb_transformer``, ``compemb_transformer_lm`` and
  ``compemb_roberta`` with their architectures (every module in ``models/``), and the
  flags ``--emb-method``, ``--emb-*`` and ``--softmax`` (see ``README.md``);
- allowlists the few classes a fairseq checkpoint holds for ``torch.load``'s safe
  (``weights_only``) loading, so that generate / resume work with torch >= 2.6 while
  any other pickled object is still refused (:mod:`fairseq_plugin.safe_load`);
- wraps ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` so that a corrupt or
  truncated checkpoint is a ``ValueError`` naming the file (every other error, and every
  successful load, unchanged).

Beyond that wrapper it changes nothing in fairseq itself: the stock models and
architectures are untouched.
"""
from .safe_load import allow_fairseq_checkpoints, install_clear_load_errors

allow_fairseq_checkpoints()
install_clear_load_errors()

from . import models  # noqa: E402,F401  (registers the models)
