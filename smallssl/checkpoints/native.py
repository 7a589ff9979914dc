"""The layouts smallssl writes: each method's checkpoint in the key names of the peer whose tools read it.

In memory every method keeps its query encoder as ``encoder_q.backbone`` + ``encoder_q.head`` (and
``encoder_k.*``, ``teacher.*``, ``queue`` ...). :func:`to_native` renames a method's ``state_dict()`` to a peer
layout when a checkpoint is written; :func:`from_native` renames a file's tensors back, given the names the
method expects, and detects which layout a file is in (so files of every earlier smallssl version still load).

Layouts (``module.`` is prepended to every key, as DDP checkpoints of the peers have it)::

    "moco"  (MoCo, SimCLR, BYOL, SimSiam, Barlow Twins; MoCo's ``main_lincls.py`` / ssl-small read it)
        encoder_q.<backbone names>          the architecture's own names (torchvision: conv1, layer1.0 ...)
        encoder_q.fc.<head>                 MoCo v2 / ssl-small MLP ``fc.0 / fc.2``; v1's single Linear: ``fc.weight``
        encoder_k.*                         the same for the key / target encoder
        queue (dim, K), queue_ptr           MoCo's queue orientation (smallssl computes with (K, dim) rows)
        predictor.* ...                     any other module of the method, unchanged
    "seed"  (SEED; SEED's ``main_lincls.py`` and ssl-small's ``distill_ckpt2moco_ckpt`` read it)
        student.<backbone>, student.fc.<head>, teacher.<backbone>, teacher.fc.<head>, queue (dim, K)
    "swav"  (SwAV; SwAV's ``eval_linear.py`` reads it)
        <backbone>, projection_head.<head>, prototypes.weight, queue / queue_count (smallssl's SwAV queue, as is)
    "smallssl"  (read only: files written before these layouts) the in-memory names, queue (K, dim)

A queue is transposed because of the layout a file is in, never because of its shape (a ``(dim, K)`` queue with
``K == dim`` is square).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .report import is_lazy, shape_of

WRITE_LAYOUTS = ("moco", "seed", "swav")
READ_LAYOUTS = WRITE_LAYOUTS + ("smallssl",)
METHOD_LAYOUT = {"moco": "moco", "simclr": "moco", "byol": "moco", "simsiam": "moco", "barlow": "moco",
                 "seed": "seed", "swav": "swav"}
# (in-memory encoder, file prefix) per layout; the head module is renamed to HEAD_NAME[layout].
ENCODERS = {
    "moco": (("encoder_q.", "encoder_q."), ("encoder_k.", "encoder_k.")),
    "seed": (("encoder_q.", "student."), ("teacher.", "teacher.")),
    "swav": (("encoder_q.", ""),),
}
HEAD_NAME = {"moco": "fc", "seed": "fc", "swav": "projection_head"}
TRANSPOSED_QUEUE = {"moco": True, "seed": True, "swav": False, "smallssl": False}
LAYOUT_KEY = "layout"  # top-level checkpoint entry naming the layout of "state_dict"


def layout_for_method(method_name: str) -> str:
    """The layout ``method_name`` writes (``moco`` for methods without a peer layout of their own)."""
    return METHOD_LAYOUT.get(method_name, "moco")


def _single_linear(head_keys: set[str]) -> str | None:
    """``"0."`` / ``""`` when the head is one Linear (MoCo v1 ``fc``), written with bare ``weight`` / ``bias``."""
    for p in ("0.", ""):
        if {p + "weight"} <= head_keys <= {p + "weight", p + "bias"}:
            return p
    return None


def native_names(keys: Iterable[str], layout: str) -> dict[str, str]:
    """``{in-memory key: file key without "module."}`` for a method's state-dict ``keys`` in ``layout``."""
    if layout not in READ_LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose one of {', '.join(READ_LAYOUTS)}")
    keys = list(keys)
    if layout == "smallssl":
        return {k: k for k in keys}
    out = {k: k for k in keys}
    for ours, theirs in ENCODERS[layout]:
        head_keys = {k[len(ours) + 5:] for k in keys if k.startswith(ours + "head.")}
        single = _single_linear(head_keys)
        for k in keys:
            if k.startswith(ours + "backbone."):
                out[k] = theirs + k[len(ours) + 9:]
            elif k.startswith(ours + "head."):
                name = k[len(ours) + 5:]
                if single is not None:
                    name = name[len(single):]
                out[k] = theirs + HEAD_NAME[layout] + "." + name
    return out


def to_native(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """A method's ``state_dict()`` renamed to ``layout`` (keys prefixed ``module.``); see the module docstring.

    Raises ``ValueError`` when two tensors would get the same name (a backbone with its own ``fc`` module).
    """
    if layout not in WRITE_LAYOUTS:
        raise ValueError(f"smallssl writes layouts {', '.join(WRITE_LAYOUTS)}, not {layout!r}")
    names = native_names(state.keys(), layout)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        name = "module." + names[k]
        if name in out:
            raise ValueError(f"cannot write layout {layout!r}: {k!r} and another tensor both become {name!r}")
        if k == "queue" and TRANSPOSED_QUEUE[layout] and v.ndim == 2:
            v = v.T.contiguous()  # (K, dim) rows -> MoCo / SEED's (dim, K)
        out[name] = v
    return out


def strip_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop one leading ``module.`` (DDP) from every key; a lazy mapping is read one key at a time."""
    return {(k[7:] if k.startswith("module.") else k): k for k in state}  # new name -> original key


def query_head_of(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The file's query / student projection head in ``layout``, keys relative to the head (``0.weight``;
    MoCo v1's bare ``weight`` / ``bias`` become ``0.weight`` / ``0.bias``, as :func:`..heads.build_head` names them)."""
    names = strip_module(state)
    if layout == "smallssl":
        prefix = "encoder_q.head."
    else:
        prefix = dict(ENCODERS[layout])["encoder_q."] + HEAD_NAME[layout] + "."
    out = {n[len(prefix):]: state[k] for n, k in names.items() if n.startswith(prefix)}
    if _single_linear(set(out)) == "":
        out = {"0." + k: v for k, v in out.items()}
    return out


def detect_layout(file_keys: Iterable[str], model_keys: Iterable[str]) -> str:
    """The layout in which most of ``model_keys`` (in-memory names) are found among ``file_keys`` (no
    ``module.``); files written before the native layouts (``encoder_q.backbone.*``) are ``smallssl``."""
    file_keys = set(file_keys)
    model_keys = list(model_keys)
    best, best_n = "smallssl", -1
    for layout in READ_LAYOUTS[::-1]:  # smallssl first: identical names on ties (a model without encoders)
        names = native_names(model_keys, layout)
        n = sum(1 for k in model_keys if k != "queue" and names[k] in file_keys)
        if n > best_n:
            best, best_n = layout, n
    return best


class RenamedState(Mapping):
    """A lazy file state seen under in-memory names: ``{name: file key}``, tensors read (and the queue
    transposed) on access, shapes from the file's metadata."""

    def __init__(self, state: Mapping[str, torch.Tensor], names: dict[str, str], transpose: set[str]):
        self._state, self._names, self._transpose = state, names, transpose

    def __getitem__(self, name: str) -> torch.Tensor:
        v = self._state[self._names[name]]
        return v.T.contiguous() if name in self._transpose else v

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        s = shape_of(self._state, self._names[name])
        return s[::-1] if name in self._transpose else s


def from_native(state: Mapping[str, torch.Tensor], model_keys: Iterable[str], layout: str | None = None
                ) -> tuple[Mapping[str, torch.Tensor], str, list[str]]:
    """Rename a file's tensors (keys with or without ``module.``) to a method's in-memory names.

    Args:
        state: the file's state dict; a lazy one (sliced / sharded) gives a lazy :class:`RenamedState`.
        model_keys: the method's ``state_dict()`` keys (those wanted).
        layout: the file's layout (its ``"layout"`` entry); None detects it with :func:`detect_layout`.

    Returns:
        ``(renamed tensors, layout, unused file keys)``; the queue is transposed back to (K, dim) when the
        layout stores (dim, K).
    """
    original = strip_module(state)
    model_keys = list(model_keys)
    if layout is None:
        layout = detect_layout(original.keys(), model_keys)
    names = native_names(model_keys, layout)
    found = {k: original[names[k]] for k in model_keys if names[k] in original}
    transpose = {k for k in found if k == "queue" and TRANSPOSED_QUEUE[layout] and len(shape_of(state, found[k])) == 2}
    used = set(found.values())
    unused = sorted(k for k in state if k not in used)
    if is_lazy(state):
        return RenamedState(state, found, transpose), layout, unused
    out = {k: (state[src].T.contiguous() if k in transpose else state[src]) for k, src in found.items()}
    return out, layout, unused
